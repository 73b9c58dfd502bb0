"""Validation-objective hypergradient learning rates: HD-val, RTHO and MARTHE (spec §5, ``papers/marthe.txt``).

This module owns

* :class:`MartheRule`, the functional core: the forward-mode tangent system Z ≈ dw/dη of the MARTHE paper (eq. 9)
  for three base dynamics (SGD, heavy-ball SGD with momentum, Adam), the parameter step, and the learning-rate /
  hyper-learning-rate / damping updates (Alg. 1, eq. 5, App. B), with the sign of the β update corrected (spec A-M1);
* :class:`Marthe`, its ``torch.optim`` face, which evaluates the training closure, the Hessian-vector product and the
  validation closure and calls the core; and
* the registered names ``hd-val`` (μ ≡ 0), ``rtho`` (μ ≡ 1) and ``marthe`` (adaptive μ and β).

The core is differentiable in every hyper-quantity (η, β, μ may be tensors carrying gradients) so that a learned
damping rule can compute μ_{t+1} from the quantities h_μ uses (:class:`MartheDiagnostics`) and backpropagate through
it. See :meth:`MartheRule.hyper_step` for that hook.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from metaopt.baselines import (adam_apply, adam_denominator, adam_direction, adam_moments, apply_update,
                               sgd_direction, with_weight_decay)
from metaopt.core import CoreOptimizer, FunctionalOptimizer, Params, check_betas, check_range
from metaopt.numerics import dot64
from metaopt.registry import register_optimizer

logger = logging.getLogger(__name__)

Scalar = Union[float, Tensor]

BASES = ("sgd", "momentum", "adam")
HYPER_OBJECTIVES = ("validation", "next-batch")

# Initial learning rates per base dynamics, from the paper's experiments (spec §5c, A-M7): §5's MNIST toy problem
# uses SGD with η0 = 0.01; §6 uses η0 = 0.1 for SGDM (VGG-11-BN, CIFAR-10) and 3e-4 for Adam (ResNet-18, CIFAR-100).
DEFAULT_LR = {"sgd": 0.01, "momentum": 0.1, "adam": 3e-4}
DEFAULT_MOMENTUM = 0.9  # paper §6: "Momentum for SGDM is kept constant to 0.9"


# ----------------------------------------------------------------------------------------------------------------------
# State and diagnostics


class MartheSGDState(NamedTuple):
    """Core state for base ``"sgd"``. Scalars are group-level; dicts are per parameter (spec §5a)."""
    step: int                       # number of steps taken (t)
    lr: Scalar                      # η_t, the rate the next step uses
    hypergrad_lr: Scalar            # β_t
    damping: Scalar                 # μ_t
    horizon: Scalar                 # c_t
    delta_lr: Scalar                # Δη_t (the last hypergradient estimate; Δη_0 = 0)
    tangent: dict[str, Tensor]      # Z^w_t ≈ dw_t/dη
    direction: dict[str, Tensor]    # d_{t-1}, the last update direction (for g'_1)


class MartheMomentumState(NamedTuple):
    """Core state for base ``"momentum"`` (heavy ball, torch convention)."""
    step: int
    lr: Scalar
    hypergrad_lr: Scalar
    damping: Scalar
    horizon: Scalar
    delta_lr: Scalar
    tangent: dict[str, Tensor]
    direction: dict[str, Tensor]
    momentum_buffer: dict[str, Tensor]          # v_t
    tangent_momentum_buffer: dict[str, Tensor]  # Z^v_t ≈ dv_t/dη


class MartheAdamState(NamedTuple):
    """Core state for base ``"adam"`` (torch's arithmetic)."""
    step: int
    lr: Scalar
    hypergrad_lr: Scalar
    damping: Scalar
    horizon: Scalar
    delta_lr: Scalar
    tangent: dict[str, Tensor]
    direction: dict[str, Tensor]
    exp_avg: dict[str, Tensor]             # m_t
    exp_avg_sq: dict[str, Tensor]          # v_t
    tangent_exp_avg: dict[str, Tensor]     # Z^m_t
    tangent_exp_avg_sq: dict[str, Tensor]  # Z^v_t


MartheState = Union[MartheSGDState, MartheMomentumState, MartheAdamState]


class MartheDiagnostics(NamedTuple):
    """What the hyper-step at the end of step t computed; what a damping rule h_μ may look at (App. B).

    Python floats on the optimizer face; tensors (possibly carrying gradients) in the differentiable core.
    """
    delta_lr: Scalar           # Δη_{t+1} = ⟨∇E(w_{t+1}), Z^w_{t+1}⟩
    delta_lr_prev: Scalar      # Δη_t
    g1: Scalar                 # g'_1 = −⟨d_t, ∇E(w_{t+1})⟩, the one-step (HD) hypergradient
    ratio: Scalar              # r = Δη_{t+1} / g'_1 (0 when g'_1 = 0, A-M8)
    q_tilde: Scalar            # q̃ = clip(r, 0, 1)
    horizon: Scalar            # c_t (the counter *before* this update)
    damping: Scalar            # μ_t (the damping this step's tangent update used)
    hypergrad_lr: Scalar       # β_{t+1}
    lr_unclipped: Scalar       # η_t − β_{t+1}·Δη_{t+1}, before the clip at 0 (negative means the clip acted)


MuHook = Union[Scalar, Callable[[MartheDiagnostics], Scalar]]

# ----------------------------------------------------------------------------------------------------------------------
# Scalar helpers: one code path for Python floats (the optimizer face, exact IEEE double arithmetic) and tensors
# (the differentiable core).


def _relu(x: Scalar) -> Scalar:
    return torch.clamp(x, min=0.0) if isinstance(x, Tensor) else max(x, 0.0)


def _clip01(x: Scalar) -> Scalar:
    return torch.clamp(x, 0.0, 1.0) if isinstance(x, Tensor) else min(max(x, 0.0), 1.0)


def _safe_ratio(num: Scalar, den: Scalar) -> Scalar:
    """num / den, and 0 where den = 0 (A-M8); differentiable on the tensor path (no 0/0 in the graph)."""
    if isinstance(num, Tensor) or isinstance(den, Tensor):
        num, den = torch.as_tensor(num), torch.as_tensor(den)
        nonzero = den != 0
        return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))
    return num / den if den != 0 else 0.0


def _dot(a: Params, b: Params) -> Tensor:
    """Σ_p ⟨a_p, b_p⟩ over the parameters both dicts hold (a missing parameter contributes 0), accumulated in
    float64 tensor by tensor in order, as SGD-HD's ``global_hypergradient`` does (so HD-train equals SGD-HD bit for
    bit). A 0-dim float64 tensor, differentiable in both arguments."""
    total = None
    for n, x in a.items():
        if n in b:
            term = dot64(x, b[n])
            total = term if total is None else total + term
    if total is None:
        raise ValueError("no parameter in common between the gradients and the optimizer state")
    return total


def _is_zero_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and x == 0


def check_mu(mu: Any, name: str = "mu") -> None:
    """``mu`` is ``"adaptive"`` or a damping factor in [0, 1] (a number or a one-element tensor)."""
    if isinstance(mu, str):
        if mu != "adaptive":
            raise ValueError(f"Invalid {name}: {mu!r} (expected 'adaptive' or a number in [0, 1])")
        return
    if isinstance(mu, bool) or not isinstance(mu, (Real, Tensor)):
        raise ValueError(f"Invalid {name}: {mu!r} (expected 'adaptive' or a number in [0, 1])")
    check_range(name, mu.detach() if isinstance(mu, Tensor) else mu, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# The functional core


class MartheRule(FunctionalOptimizer):
    r"""The MARTHE update (spec §5b) over a base optimizer, as a pure function of dicts of tensors.

    One optimizer step t is two calls, because E is evaluated at the new parameters:

    1. :meth:`step` ``(params, grads, state, hvp)`` — the tangent update (spec §5 step 3; paper eq. 9 with the
       homogeneous part damped by μ_t) and the parameter step w_{t+1} = w_t − η_t·d_t. ``grads`` is ∇L_t(w_t) of the
       *unregularized* training loss; the rule adds coupled weight decay λ·w (so H_t includes λI, A-M6).
       ``hvp`` gives H_t·Z^w_t for the same loss (without λ; the rule adds λ·Z): a callable ``hvp(z) -> H·z`` or the
       product itself as a dict. It is used only when :meth:`needs_hvp` is true, and may be ``None`` otherwise.
    2. :meth:`hyper_step` ``(state, val_grads, mu=None)`` — with e = ∇E(w_{t+1}): Δη_{t+1} = ⟨e, Z^w_{t+1}⟩,
       g'_1 = −⟨d_t, e⟩, the damping μ_{t+1}, the counter c_{t+1} = μ_t(1 + c_t), β_{t+1} and
       η_{t+1} = max(η_t − β_{t+1}Δη_{t+1}, 0).

    Tangent systems (μ = μ_t, η = η_t, HZ = (H_t + λI)·Z^w_t, d = d_t):

    * sgd:      Z^w ← μ(Z^w − η·HZ) − d
    * momentum: P^v = m·Z^v + HZ;  Z^v ← μ·P^v;  Z^w ← μ(Z^w − η·P^v) − v_{t+1}   (torch: v_{t+1} = m·v_t + g_t)
    * adam:     P^m = β1·Z^m + (1−β1)·HZ;  P^v = β2·Z^v + 2(1−β2)·g⊙HZ;  Z^m ← μP^m;  Z^v ← μP^v;
      Z^w ← μ(Z^w − η·c1·(P^m/D − m⊙P^v/(2√(c2·v)·D²))) − d, with c1 = 1/(1−β1^k), c2 = 1−β2^k,
      D = √(v/c2)+ε and the v = 0 entries of the second term set to 0.

    Differentiability and truncation. Nothing is detached here: a tensor η, β or μ (or parameters carrying a graph)
    flows through both calls, and a differentiable ``hvp`` callable makes Z differentiable too. Truncating (the
    "always detach Z" of spec §5b) is the caller's decision; the optimizer face runs the core under ``no_grad``.
    Δη and g'_1 are accumulated in float64. With every hyper-quantity a Python number and no gradients involved, they
    are converted to Python floats so that the learning-rate arithmetic is exact IEEE double arithmetic; otherwise
    the hyper-quantities are 0-dim float64 tensors.

    Hook for a learned damping rule: ``hyper_step(state, val_grads, mu=...)`` takes μ_{t+1} from outside — a number, a
    tensor (possibly carrying gradients) or a callable ``mu(diagnostics) -> μ_{t+1}`` that receives the
    :class:`MartheDiagnostics` (q̃, c_t, Δη_t, Δη_{t+1}, g'_1, …) the built-in h_μ would use. It returns
    ``(state, diagnostics)``. A rule constructed with a tensor ``mu`` uses that tensor as a fixed damping.

    Args:
        lr: η_0, the first step's learning rate (later ones live in the state).
        hypergrad_lr: β_0, the hyper-learning rate.
        base: ``"sgd"``, ``"momentum"`` (heavy ball, dampening 0) or ``"adam"``.
        momentum: the heavy-ball coefficient m (base ``"momentum"`` only).
        betas, eps: Adam's (β1, β2) and ε (base ``"adam"`` only; torch's ε placement).
        weight_decay: coupled L2 factor λ, part of L (and of H) but not of E.
        mu: ``"adaptive"`` (h_μ of App. B) or a fixed damping in [0, 1] (0: HD, 1: RTHO); may be a tensor.
        adapt_hypergrad_lr: β_hyper, the step size of the β update, or ``None`` for a fixed β.
        paper_beta_sign: use the paper's literal β_{t+1} = β_t − β_hyper·Δη_{t+1}·Δη_t (replication only; with
            η_0 = β_0 = 0 it leaves η ≡ 0, spec M-6) instead of the corrected ``+`` (A-M1).
    """

    def __init__(self, lr: Scalar = 0.1, hypergrad_lr: Scalar = 0.0, base: str = "momentum",
                 momentum: float = DEFAULT_MOMENTUM, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, mu: Scalar | str = "adaptive", adapt_hypergrad_lr: float | None = None,
                 paper_beta_sign: bool = False):
        if base not in BASES:
            raise ValueError(f"Invalid base: {base!r} (expected one of {BASES})")
        check_mu(mu)
        self.lr, self.hypergrad_lr, self.base = lr, hypergrad_lr, base
        self.momentum, (self.beta1, self.beta2), self.eps = momentum, tuple(betas), eps
        self.weight_decay, self.mu = weight_decay, mu
        self.adapt_hypergrad_lr, self.paper_beta_sign = adapt_hypergrad_lr, paper_beta_sign

    # -- state ------------------------------------------------------------------------------------------------------

    def init(self, params: Params) -> MartheState:
        """Z_0 = 0, Δη_0 = 0, c_0 = 0; μ_0 = 0 for the adaptive rule (Alg. 1), the fixed value otherwise."""
        def zeros() -> dict[str, Tensor]:
            return {n: torch.zeros_like(p) for n, p in params.items()}

        damping = 0.0 if isinstance(self.mu, str) else self.mu
        common = (0, self.lr, self.hypergrad_lr, damping, 0.0, 0.0, zeros(), zeros())
        if self.base == "sgd":
            return MartheSGDState(*common)
        if self.base == "momentum":
            return MartheMomentumState(*common, zeros(), zeros())
        return MartheAdamState(*common, zeros(), zeros(), zeros(), zeros())

    def needs_hvp(self, state: MartheState) -> bool:
        """Whether :meth:`step` uses H_t·Z_t: not on the first step (Z_0 = 0) and not when μ_t is the number 0."""
        return state.step > 0 and not _is_zero_number(state.damping)

    # -- phase 1: tangent update and parameter step -----------------------------------------------------------------

    def step(self, params: Params, grads: Params, state: MartheState,
             hvp: Callable[[Params], Params] | Params | None = None) -> tuple[Params, MartheState]:
        """Tangent update and w_{t+1} = w_t − η_t·d_t. Returns the new parameters and state (inputs untouched)."""
        lr, mu, wd = state.lr, state.damping, self.weight_decay
        damped = self.needs_hvp(state)
        hz: Params = {}
        if damped:
            if hvp is None:
                raise ValueError("MartheRule.step needs hvp (H_t·Z_t) when the damping μ_t is non-zero after the "
                                 "first step")
            raw = hvp(state.tangent) if callable(hvp) else hvp
            for n, z in state.tangent.items():
                h = raw.get(n)
                hz[n] = with_weight_decay(torch.zeros_like(z) if h is None else h, z, wd)  # (H + λI)·Z

        k = state.step + 1
        new_params: Params = {}
        tangent: Params = {}
        direction: Params = {}
        extra: dict[str, Params] = {f: {} for f in state._fields[8:]}
        for n, p in params.items():
            g = with_weight_decay(grads[n], p, wd)
            z = state.tangent[n]
            if self.base == "sgd":
                d = g
                tangent[n] = mu * apply_update(z, hz[n], lr) - d if damped else -d
                new_params[n] = apply_update(p, d, lr)
            elif self.base == "momentum":
                d, buf = sgd_direction(g, state.momentum_buffer[n], state.step == 0, self.momentum, 0.0, False)
                if damped:
                    pv = state.tangent_momentum_buffer[n] * self.momentum + hz[n]
                    extra["tangent_momentum_buffer"][n] = mu * pv
                    tangent[n] = mu * apply_update(z, pv, lr) - d
                else:
                    extra["tangent_momentum_buffer"][n] = torch.zeros_like(p)
                    tangent[n] = -d
                extra["momentum_buffer"][n] = buf
                new_params[n] = apply_update(p, d, lr)
            else:
                m, v = adam_moments(g, state.exp_avg[n], state.exp_avg_sq[n], self.beta1, self.beta2)
                d = adam_direction(m, v, k, self.beta1, self.beta2, self.eps)
                if damped:
                    pm = state.tangent_exp_avg[n] * self.beta1 + (1 - self.beta1) * hz[n]
                    pv = state.tangent_exp_avg_sq[n] * self.beta2 + (2 * (1 - self.beta2)) * g * hz[n]
                    denom = adam_denominator(v, k, self.beta2, self.eps)
                    positive = v > 0  # guard v = 0 (then m = 0 too): the ∂D/∂v term is 0 there
                    sqrt_c2v = torch.where(positive, v.sqrt() * math.sqrt(1 - self.beta2**k), torch.ones_like(v))
                    dv_term = torch.where(positive, m * pv / (2 * sqrt_c2v * denom * denom), torch.zeros_like(v))
                    dd = (pm / denom - dv_term) / (1 - self.beta1**k)  # d(direction)/dη
                    extra["tangent_exp_avg"][n], extra["tangent_exp_avg_sq"][n] = mu * pm, mu * pv
                    tangent[n] = mu * apply_update(z, dd, lr) - d
                else:
                    extra["tangent_exp_avg"][n] = torch.zeros_like(p)
                    extra["tangent_exp_avg_sq"][n] = torch.zeros_like(p)
                    tangent[n] = -d
                extra["exp_avg"][n], extra["exp_avg_sq"][n] = m, v
                new_params[n] = adam_apply(p, m, v, k, lr, self.beta1, self.beta2, self.eps)
            direction[n] = d
        return new_params, state._replace(step=k, tangent=tangent, direction=direction, **extra)

    # -- phase 2: hypergradient, damping, hyper-learning rate and learning rate ---------------------------------------

    def hyper_step(self, state: MartheState, val_grads: Params,
                   mu: MuHook | None = None) -> tuple[MartheState, MartheDiagnostics]:
        """Learning-rate update from e = ∇E(w_{t+1}) (spec §5b steps 6–9). Returns (state, diagnostics).

        ``mu`` overrides the damping rule for μ_{t+1} (a number, a tensor, or a callable on the diagnostics);
        by default it is h_μ (App. B: μ_{t+1} = q̃^{1/(c_t+1)}) for ``mu="adaptive"``, else the fixed value.
        """
        delta = _dot(val_grads, state.tangent)
        g1 = -_dot(state.direction, val_grads)
        scalars = (state.lr, state.hypergrad_lr, state.damping, state.horizon, state.delta_lr, self.mu)
        if not (delta.requires_grad or g1.requires_grad or any(isinstance(s, Tensor) for s in scalars)):
            delta, g1 = torch.stack([delta, g1]).tolist()  # the face: exact double arithmetic from here on (one read)

        ratio = _safe_ratio(delta, g1)
        q_tilde = _clip01(ratio)
        beta = state.hypergrad_lr
        if self.adapt_hypergrad_lr is not None:
            # ∂η_t/∂β_t = −Δη_t, so descent on β is β + β_hyper·Δη_{t+1}·Δη_t (A-M1; spec App. A5).
            sign = -1.0 if self.paper_beta_sign else 1.0
            beta = _relu(beta + sign * self.adapt_hypergrad_lr * delta * state.delta_lr)
        lr_unclipped = state.lr - beta * delta
        diagnostics = MartheDiagnostics(delta, state.delta_lr, g1, ratio, q_tilde, state.horizon, state.damping,
                                        beta, lr_unclipped)

        if mu is not None:
            damping = mu(diagnostics) if callable(mu) else mu
        elif isinstance(self.mu, str):  # "adaptive": h_μ with the *old* counter c_t (A-M3)
            damping = q_tilde ** (1.0 / (state.horizon + 1.0))
        else:
            damping = self.mu
        new_state = state._replace(lr=_relu(lr_unclipped), hypergrad_lr=beta, damping=damping,
                                   horizon=state.damping * (1.0 + state.horizon), delta_lr=delta)
        return new_state, diagnostics


# ----------------------------------------------------------------------------------------------------------------------
# Closures that call backward themselves


class _RetainGraphInClosure(TorchFunctionMode):
    """Makes ``loss.backward()`` / ``torch.autograd.backward`` inside a closure keep the graph (``retain_graph=True``).

    The optimizer differentiates the loss the closure returns itself (``create_graph=True`` when it needs a
    Hessian-vector product). A closure written for ``torch.optim`` usually also calls ``loss.backward()``, which
    frees the graph; this mode, active only while the closure runs, turns that call into
    ``loss.backward(retain_graph=True)`` through torch's documented ``__torch_function__`` override mechanism. The
    user's ``p.grad`` is filled as usual; the cost is that backward pass, which the optimizer does not use.
    """

    def __init__(self) -> None:
        super().__init__()
        self.backward_calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.backward or func is torch.autograd.backward:
            bound = inspect.signature(func).bind(*args, **kwargs)
            bound.arguments["retain_graph"] = True
            self.backward_calls += 1
            return func(*bound.args, **bound.kwargs)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# The torch.optim face


class Marthe(CoreOptimizer):
    r"""MARTHE (Moving Average Real-Time Hyperparameter Estimation), with HD-val and RTHO as special cases.

    Donini et al., "Scheduling the learning rate via hypergradients: new insights and a new algorithm" (ICLR 2020
    submission, ``papers/marthe.txt``); spec §5. Per step t, on a training batch B_t and a validation batch:

    * Z_{t+1} = μ_t·A_t·Z_t + [B_t]_t (eq. 9), i.e. for SGD Z_{t+1} = μ_t(Z_t − η_t·H_t·Z_t) − ∇L_t(w_t)
      (SGDM and Adam: :class:`MartheRule`), with one Hessian-vector product H_t·Z_t (double backward);
    * w_{t+1} = Φ_t(w_t, η_t) = w_t − η_t·d_t with the base optimizer's direction d_t;
    * Δη_{t+1} = Z_{t+1}ᵀ∇E(w_{t+1}) (eq. 11) from one validation forward/backward;
    * μ_{t+1} = h_μ = q̃^{1/(c_t+1)}, q̃ = clip(Δη_{t+1}/g'_1, 0, 1), g'_1 = −d_tᵀ∇E(w_{t+1}),
      c_{t+1} = μ_t(1 + c_t) (App. B, eq. 10);
    * β_{t+1} = max(β_t + β_hyper·Δη_{t+1}·Δη_t, 0) (Alg. 1 with the sign corrected, spec A-M1);
    * η_{t+1} = max(η_t − β_{t+1}·Δη_{t+1}, 0) (eq. 5), written to ``param_groups[i]["lr"]``.

    μ ≡ 0 gives HD on the validation objective (no Hessian-vector product and no ``create_graph``), μ ≡ 1 gives RTHO
    (Franceschi et al. 2017, hyper-update every step).

    Usage: ``opt.step(closure, val_closure=None)``. ``closure()`` returns the training loss on the current batch
    as a tensor with its graph (it may also call ``loss.backward()``; see :class:`_RetainGraphInClosure`);
    ``val_closure()`` returns the validation loss E at the current parameters. Without ``val_closure``, E is the
    training closure re-evaluated at w_{t+1}. After each call ``lr`` holds η_{t+1}, the rate the next step uses.
    With ``hyper_objective="next-batch"`` (spec "HD-train"), E is the *next* step's training loss (weight decay
    included) and its gradient is reused: the hyper-step of step t runs at the start of step t+1, no validation pass
    is made, ``lr`` after a call is the rate that call used, and μ ≡ 0 equals SGD-HD exactly (M-1).

    Defaults (paper §6, spec A-M7): η_0 = 0.01 (sgd, paper §5), 0.1 (momentum), 3e-4 (adam); momentum 0.9; Adam
    betas (0.9, 0.999), ε = 1e-8 ("standard values"); weight decay 0 (the paper trains with 5e-4 in L).
    ``marthe``: β_0 = 0 (Alg. 1 "requires β_0 = 0") and β_hyper = 1e-6 (the authors' code, adatune ``--alpha``;
    the paper prescribes no number: start high and divide by 10 until training stops diverging).
    ``hd-val``: β = 1e-6; ``rtho``: β = 1e-8 (the paper's grid-searched values, §6).

    Memory per parameter element: Z^w and d (+2n) for sgd; plus v and Z^v (+4n) for momentum; plus m, v, Z^m, Z^v
    (+6n) for adam; plus the training graph kept for the double backward while a step runs.

    Group-level state in ``param_groups[i]``: ``lr`` (η_t), ``hypergrad_lr`` (β_t), ``damping`` (μ_t), ``horizon``
    (c_t), ``delta_lr`` (Δη_t), ``step``, and counters ``hvp_evals``, ``val_evals``, ``lr_clipped`` (η clipped at 0,
    also logged), ``zero_g1`` (g'_1 = 0, μ reset, A-M8) and ``nonfinite_skipped``. ``opt.diagnostics[i]`` holds the
    last :class:`MartheDiagnostics` of group i.

    Several param groups are several independent tangent systems over their own parameters (the Hessian's
    cross-group blocks are not propagated); with one group, the usual case, the tangent system is exact.

    Args:
        params: parameters or param groups.
        lr: η_0 (``None``: the default for ``base``).
        hypergrad_lr: β_0.
        base: ``"sgd"``, ``"momentum"`` or ``"adam"``.
        momentum: heavy-ball coefficient for ``base="momentum"`` (``None``: 0.9); must be unset or 0 for other bases.
        betas, eps: Adam's hyper-parameters (``base="adam"``).
        weight_decay: coupled L2 λ, in L and in the tangent's Hessian, not in E.
        mu: ``"adaptive"`` or a fixed damping in [0, 1].
        adapt_hypergrad_lr: β_hyper, or ``None`` for a fixed β.
        paper_beta_sign: the paper's literal (ascending) β update, for replication only.
        hyper_objective: ``"validation"`` (default) or ``"next-batch"``.
        mu_rule: optional callable ``mu_rule(diagnostics) -> μ_{t+1}`` (floats) replacing the damping rule; the hook
            for a learned h_μ on the face (the core takes tensors, see :meth:`MartheRule.hyper_step`).
        nonfinite: ``"skip"`` or ``"raise"`` for non-finite gradients, Hessian-vector products or hyper-updates.
            A non-finite validation gradient skips only that step's learning-rate update (the parameters have moved).
    """

    requires_closure = True  # step(closure, val_closure=None): the optimizer differentiates the loss itself
    accepts_val_closure = True  # (metaopt.core.step_needs)

    def __init__(self, params: Iterable[Any], lr: float | None = None, hypergrad_lr: float = 0.0,
                 base: str = "momentum", momentum: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, mu: float | str = "adaptive",
                 adapt_hypergrad_lr: float | None = 1e-6, *, paper_beta_sign: bool = False,
                 hyper_objective: str = "validation",
                 mu_rule: Callable[[MartheDiagnostics], float] | None = None, nonfinite: str = "skip"):
        if base not in BASES:
            raise ValueError(f"Invalid base: {base!r} (expected one of {BASES})")
        if hyper_objective not in HYPER_OBJECTIVES:
            raise ValueError(f"Invalid hyper_objective: {hyper_objective!r} (expected one of {HYPER_OBJECTIVES})")
        if mu_rule is not None and not callable(mu_rule):
            raise ValueError(f"Invalid mu_rule: {mu_rule!r} (expected a callable on MartheDiagnostics)")
        if base == "momentum" and momentum is None:
            momentum = DEFAULT_MOMENTUM
        defaults = dict(lr=DEFAULT_LR[base] if lr is None else lr, hypergrad_lr=hypergrad_lr, base=base,
                        momentum=0.0 if momentum is None else momentum, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, mu=mu, adapt_hypergrad_lr=adapt_hypergrad_lr,
                        paper_beta_sign=bool(paper_beta_sign), hvp_evals=0, val_evals=0, lr_clipped=0, zero_g1=0)
        self._check_group(defaults)
        self.hyper_objective = hyper_objective
        self.mu_rule = mu_rule
        super().__init__(params, defaults, nonfinite=nonfinite)
        self.diagnostics: list[MartheDiagnostics | None] = [None] * len(self.param_groups)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        if group["base"] not in BASES:
            raise ValueError(f"Invalid base: {group['base']!r} (expected one of {BASES})")
        check_range("learning rate", group["lr"])
        check_range("hypergrad_lr", group["hypergrad_lr"])
        if group["adapt_hypergrad_lr"] is not None:
            check_range("adapt_hypergrad_lr", group["adapt_hypergrad_lr"])
        check_mu(group["mu"])
        check_range("weight_decay value", group["weight_decay"])
        if group["base"] == "momentum":
            check_range("momentum value", group["momentum"], 0.0, 1.0, high_open=True)
        elif group["momentum"] != 0:
            raise ValueError(f"Invalid momentum: {group['momentum']!r} (base {group['base']!r} has no momentum; "
                             "use base='momentum')")
        if group["base"] == "adam":
            check_betas(group["betas"])
            check_range("epsilon value", group["eps"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        if hasattr(self, "diagnostics"):
            self.diagnostics.append(None)

    def rule(self, group: dict[str, Any]) -> MartheRule:
        return MartheRule(group["lr"], group["hypergrad_lr"], group["base"], group["momentum"],
                          tuple(group["betas"]), group["eps"], group["weight_decay"], group["mu"],
                          group["adapt_hypergrad_lr"], group["paper_beta_sign"])

    # -- the step ---------------------------------------------------------------------------------------------------

    def step(self, closure: Callable[[], Tensor] | None = None,  # type: ignore[override]
             val_closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One MARTHE step; returns the training loss (detached). See the class docstring for the protocol."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs closure: a callable returning the training loss "
                             "(a tensor with its graph)")
        next_batch = self.hyper_objective == "next-batch"
        if next_batch and val_closure is not None:
            raise ValueError("val_closure: with hyper_objective='next-batch' the objective is the next training "
                             "batch; do not pass a val_closure")

        work = []  # (group index, group, rule, params dict, state)
        for i, group in enumerate(self.param_groups):
            names, params = self.named_params(group)
            live = {n: p for n, p in zip(names, params) if p.requires_grad}
            if live:
                rule = self.rule(group)
                work.append((i, group, rule, live, self.load_rule_state(group, rule, live)))
        if not work:
            return self._evaluate(closure).detach()

        # create_graph only where a Hessian-vector product may follow. In next-batch mode μ_{t+1} is only known
        # after the pending hyper-step, which needs this very gradient, so only a fixed μ = 0 rules it out.
        def may_need_hvp(rule: MartheRule, state: MartheState) -> bool:
            if next_batch and state.step > 0:
                return self.mu_rule is not None or not _is_zero_number(rule.mu)
            return rule.needs_hvp(state)

        create_graph = any(may_need_hvp(rule, state) for _, _, rule, _, state in work)
        loss = self._evaluate(closure)
        flat = [p for *_, live, _ in work for p in live.values()]
        with torch.enable_grad():
            all_grads = torch.autograd.grad(loss, flat, create_graph=create_graph, allow_unused=True)
        graph_grads = dict(zip(map(id, flat), all_grads))

        stepped = []
        for i, group, rule, live, state in work:
            graph = {n: graph_grads[id(p)] for n, p in live.items()}
            grads = {n: torch.zeros_like(p) if graph[n] is None else graph[n].detach() for n, p in live.items()}
            if not self.check_finite(group, grads.values()):
                continue
            if next_batch and state.step > 0:  # the hyper-step of the previous step, E = this (regularized) loss
                e = {n: with_weight_decay(g, live[n], group["weight_decay"]) for n, g in grads.items()}
                state = self._hyper_update(i, group, rule, live, state, e)
            hz = None
            if rule.needs_hvp(state):
                hz = self._hvp(graph, live, state.tangent)
                group["hvp_evals"] += 1
                if not self.check_finite(group, hz.values()):
                    continue
            with torch.no_grad():  # the truncation boundary: the tangent and parameters are stored as constants
                new_params, state = rule.step(live, grads, state, hvp=hz)
                for n, p in live.items():
                    p.copy_(new_params[n])
            self.store_rule_state(group, live, state)
            stepped.append((i, group, rule, live, state))
        train_loss = loss.detach()
        del loss, all_grads, graph_grads, graph  # free the training graph before the validation pass

        if not next_batch and stepped:
            val_loss = self._evaluate(val_closure if val_closure is not None else closure)
            flat = [p for *_, live, _ in stepped for p in live.values()]
            with torch.enable_grad():
                val_grads = dict(zip(map(id, flat), torch.autograd.grad(val_loss, flat, allow_unused=True)))
            for i, group, rule, live, state in stepped:
                group["val_evals"] += 1
                e = {n: torch.zeros_like(p) if val_grads[id(p)] is None else val_grads[id(p)]
                     for n, p in live.items()}
                if self.check_finite(group, e.values()):
                    self._hyper_update(i, group, rule, live, state, e)
        return train_loss

    # -- helpers ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _evaluate(closure: Callable[[], Tensor]) -> Tensor:
        with torch.enable_grad(), _RetainGraphInClosure():
            loss = closure()
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise TypeError("the closure must return the loss as a one-element tensor with its graph "
                            f"(got {type(loss).__name__}); return the loss tensor itself, not loss.item()")
        return loss

    @staticmethod
    def _hvp(graph_grads: dict[str, Tensor | None], params: Params, tangent: Params) -> Params:
        """H·Z by double backward: ∇_w⟨g, Z⟩ with Z constant; unused parameters (None) give 0 (adatune #4)."""
        outputs, vectors = [], []
        for n, g in graph_grads.items():
            if g is not None and g.requires_grad:
                outputs.append(g)
                vectors.append(tangent[n])
        names = list(params)
        if not outputs:
            return {n: torch.zeros_like(params[n]) for n in names}
        with torch.enable_grad():
            hz = torch.autograd.grad(outputs, [params[n] for n in names], grad_outputs=vectors, retain_graph=True,
                                     allow_unused=True)
        return {n: torch.zeros_like(params[n]) if h is None else h for n, h in zip(names, hz)}

    def _hyper_update(self, index: int, group: dict[str, Any], rule: MartheRule, params: Params,
                      state: MartheState, val_grads: Params) -> MartheState:
        """Phase 2 of the core on the face: update η, β, μ, c, Δη in the group, count and log clips."""
        with torch.no_grad():
            new_state, diag = rule.hyper_step(state, val_grads, mu=self.mu_rule)
        scalars = [new_state.lr, new_state.hypergrad_lr, new_state.damping, new_state.horizon, new_state.delta_lr]
        # A rate the parameters' dtype cannot hold (|η| past float32's 3.4e38 on a float32 model, where the float64
        # rule can still represent it) is refused like a non-finite one: torch.add(p, d, alpha=-η) cannot use it.
        limit = torch.finfo(next(iter(params.values())).dtype).max
        what = "learning rate or its hyper-parameters (NaN, inf, or beyond the parameters' floating-point range)"
        if all(isinstance(s, (int, float)) for s in scalars):  # the face's Python floats: no tensor, no host read
            finite = all(math.isfinite(s) and abs(s) <= limit for s in scalars) or self.skip_nonfinite(group, what)
        else:
            values = torch.tensor([float(s) for s in scalars], dtype=torch.float64)
            finite = bool((values.abs() <= limit).all()) or self.skip_nonfinite(group, what)
        if not finite:
            return state
        if self.mu_rule is not None:
            check_range("damping returned by mu_rule", new_state.damping, 0.0, 1.0)
        if diag.lr_unclipped < 0:
            group["lr_clipped"] += 1
            logger.info("%s group %d step %d: learning rate %.6g clipped at 0", type(self).__name__, index,
                        state.step, float(diag.lr_unclipped))
        if diag.g1 == 0:
            group["zero_g1"] += 1
            logger.info("%s group %d step %d: g'_1 = 0, q~ = 0 (damping reset)", type(self).__name__, index,
                        state.step)
        logger.debug("%s group %d step %d: lr %.6g hypergrad_lr %.6g damping %.6g delta_lr %.6g",
                     type(self).__name__, index, state.step, float(new_state.lr), float(new_state.hypergrad_lr),
                     float(new_state.damping), float(new_state.delta_lr))
        self.store_rule_state(group, params, new_state)
        self.diagnostics[index] = diag
        return new_state


# ----------------------------------------------------------------------------------------------------------------------
# Registered names


def _fixed_mu(name: str, fixed: float, mu: Any) -> float:
    if mu != fixed:
        raise ValueError(f"Invalid mu: {mu!r} ({name} fixes mu = {fixed}; use 'marthe' for another damping)")
    return fixed


# The records (metaopt.registry): test_hparams for the contract tests' least-squares problem; no memory model (the step
# evaluates the loss itself: no roofline).
@register_optimizer("marthe", kind="hypergradient", builds=Marthe, test_hparams=dict(lr=0.05, base="sgd"))
def _make_marthe(params, lr: float | None = None, hypergrad_lr: float = 0.0, base: str = "momentum",
                 mu: float | str = "adaptive", adapt_hypergrad_lr: float | None = 1e-6, **kw) -> Marthe:
    return Marthe(params, lr=lr, hypergrad_lr=hypergrad_lr, base=base, mu=mu, adapt_hypergrad_lr=adapt_hypergrad_lr,
                  **kw)


@register_optimizer("rtho", kind="hypergradient", builds=Marthe, test_hparams=dict(lr=0.05, base="sgd"))
def _make_rtho(params, lr: float | None = None, hypergrad_lr: float = 1e-8, base: str = "momentum",
               mu: float = 1.0, adapt_hypergrad_lr: float | None = None, **kw) -> Marthe:
    return Marthe(params, lr=lr, hypergrad_lr=hypergrad_lr, base=base, mu=_fixed_mu("rtho", 1.0, mu),
                  adapt_hypergrad_lr=adapt_hypergrad_lr, **kw)


@register_optimizer("hd-val", kind="hypergradient", builds=Marthe, test_hparams=dict(lr=0.05, base="sgd"))
def _make_hd_val(params, lr: float | None = None, hypergrad_lr: float = 1e-6, base: str = "momentum",
                 mu: float = 0.0, adapt_hypergrad_lr: float | None = None, **kw) -> Marthe:
    return Marthe(params, lr=lr, hypergrad_lr=hypergrad_lr, base=base, mu=_fixed_mu("hd-val", 0.0, mu),
                  adapt_hypergrad_lr=adapt_hypergrad_lr, **kw)
