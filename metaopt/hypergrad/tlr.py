"""Trainable Learning Rate (TLR; Retsinas, Sfikas, Filntisis & Maragos, ``../shared/papers/tlr.txt``; spec §7).

This module owns the TLR learning-rate rules and their ``torch.optim`` faces:

- :func:`newton_ratio` (eq. 9) and :func:`ntlr_factor` (the public NTLR code's variant): the learning-rate factors;
- :class:`TLRRule`: the functional, differentiable core of efficient GD-TLR (Alg. 2), per tensor (App. D.2), over
  windows of SGD steps (§4, eq. 10), with a fixed meta learning rate (App. D.4), and in the NTLR-compatible variant;
- :class:`NaiveTLRRule`: the functional core of naive GD-TLR (Alg. 1, a lookahead gradient on the same batch);
- :class:`TLR` (registered as ``tlr`` and ``tlr-pl``) and :class:`NaiveTLR` (``tlr-naive``), the faces.

Sign and timing (spec §1, §7). With a = <g_t, g_{t-1}>, dL_alpha/d alpha = -a (eq. 7), so alpha grows when consecutive
gradients agree. In every-step mode the new alpha multiplies the *current* gradient (Alg. 2, no lag); in window mode
the new alpha can only apply to the *next* window (A-T8, oracle T-5).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import operator
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metaopt.baselines import ForeachFace, apply_update, decayed, sgd_direction, with_weight_decay
from metaopt.core import CoreOptimizer, FunctionalOptimizer, Params, check_range
from metaopt.hypergrad.hd import NonFiniteLearningRate, warn_negative_rate_once
from metaopt.registry import MemoryModel, register_optimizer

logger = logging.getLogger(__name__)

Scalar = float | Tensor

#: Paper defaults (spec §7(c)): bound c = 1/4 (alpha grows at most 1.25x per update) and the SGD base of App. D
#: (momentum 0.8, weight decay 5e-4) used for every windowed ``sgd_tlr`` run (there with window p = 0.33 of an epoch).
DEFAULT_BOUND = 0.25
PAPER_MOMENTUM = 0.8
PAPER_WEIGHT_DECAY = 5e-4
#: The NTLR code's ``meta_gamma`` default (its README example uses 0.25).
NTLR_GAMMA = 0.20


# ----------------------------------------------------------------------------------------------------------------------
# The learning-rate factors


def newton_ratio(a: Scalar, sq_norm: Scalar, bound: Scalar) -> Scalar:
    """The relative change r in ``alpha_{t+1} = alpha_t * (1 + r)`` of efficient GD-TLR (eqs. 7-9).

    ``r = a / max(D, a / c)`` with ``a = <g_t, g_{t-1}>``, ``D = 4 (||g_t||^2 - a)`` (the second derivative, eq. 8,
    times alpha) and ``c = bound`` (eq. 9). This equals Alg. 2's ``min(a / max(D, 0), c)`` (A-T1) and lies in
    (-1/4, c]. When g_t = 0 the denominator is 0 and r = 0 (A-T1). Python floats give Python floats; a tensor
    argument gives a differentiable tensor (the g_t = 0 case masked so that its gradient stays finite).
    """
    tensors = [x for x in (a, sq_norm, bound) if isinstance(x, Tensor)]
    if not tensors:
        den = max(4 * (sq_norm - a), a / bound)
        return a / den if den > 0 else 0.0
    ref = tensors[0]
    a_t = torch.as_tensor(a, dtype=ref.dtype, device=ref.device)
    sq_t = torch.as_tensor(sq_norm, dtype=ref.dtype, device=ref.device)
    den = torch.maximum(4 * (sq_t - a_t), a_t / bound)
    live = den > 0
    return torch.where(live, a_t / torch.where(live, den, torch.ones_like(den)), torch.zeros_like(den))


def ntlr_factor(a: Scalar, prev_sq_norm: Scalar, gamma: Scalar) -> Scalar:
    """The public NTLR code's factor ``alpha_new / alpha`` (spec §7 "Variant in the public code"; replication only).

    ``1 + gamma * a / (||G_prev||^2 - a + 1e-10)`` with ``a = <G_prev, G>``: the *previous* window's norm, no bound,
    so the factor can be huge or negative (G_prev = (1, 0), G = (2, 0) gives 0.6 where eq. 9 gives 1.25). The
    operation order is the code's, so Python floats reproduce it bit for bit.
    """
    return 1 + gamma * a / (prev_sq_norm - a + 1e-10)


def _dot(x: Tensor, y: Tensor, ntlr_compat: bool = False) -> Tensor:
    """``<x, y>`` in the tensors' dtype: one ``torch.dot`` pass (half the memory traffic of a product and a sum), or
    with ``ntlr_compat`` ``(x * y).sum()``, what the NTLR code computes, so that compat mode matches it bit for bit."""
    if ntlr_compat:
        return (x * y).sum()
    return torch.dot(x.reshape(-1), y.reshape(-1))


def _to_floats(values: list[Tensor]) -> list[float]:
    """0-d tensors as Python floats with one device synchronisation when they share a device (exact conversion)."""
    try:
        return torch.stack(values).tolist()
    except RuntimeError:
        return [v.item() for v in values]


def _total(values: list[Any]) -> Any:
    """Sum in order; Python floats accumulate in double precision (as the NTLR code's ``.item()`` sums do)."""
    return functools.reduce(operator.add, values)


def _is_negative(value: Scalar) -> int | Tensor:
    """1 if the learning rate is negative (a tensor indicator for tensor values: no device synchronisation)."""
    return (value < 0).long() if isinstance(value, Tensor) else int(value < 0)


def _finite(value: Scalar, what: str) -> Scalar:
    """A Python-float learning rate must stay finite: raise NonFiniteLearningRate (the faces skip the step)."""
    if not isinstance(value, Tensor) and not math.isfinite(value):
        raise NonFiniteLearningRate(f"{what} gave a non-finite learning rate ({value!r}); the step was not applied")
    return value


def _owned(direction: Tensor, grad: Tensor) -> Tensor:
    # State must never alias the caller's gradient: p.grad is zeroed or accumulated in place by the next backward.
    return direction.clone() if direction is grad else direction


# ----------------------------------------------------------------------------------------------------------------------
# Efficient GD-TLR: every step, per window, per tensor, fixed eta, NTLR-compatible


class TLRState(NamedTuple):
    """State of :class:`TLRRule`.

    ``lr`` is the global alpha (group-level) or, per tensor, a dict of alphas (per-parameter). ``window_pos`` counts
    the steps since the last window boundary and ``boundaries`` the boundaries so far (window mode only).
    ``negative_lr_steps`` counts learning-rate updates whose result was negative (clipped to 0 with a fixed eta).
    Per parameter: the momentum buffer (empty when momentum = 0), the previous direction (g_{t-1} or G_{j-1}) and the
    parameters at the start of the current window (empty in every-step mode).
    """

    lr: Scalar | dict[str, Scalar]
    step: int
    window_pos: int
    boundaries: int
    negative_lr_steps: int | Tensor
    momentum_buffer: dict[str, Tensor]
    prev_direction: dict[str, Tensor]
    window_start: dict[str, Tensor]


class TLRRule(FunctionalOptimizer):
    """Efficient GD-TLR (Alg. 2) as a pure rule over dicts of tensors; see :class:`TLR` for the equations.

    Args:
        lr: the initial alpha (Python float: torch's exact arithmetic; tensor: differentiable).
        bound: c of eq. 9 (float or tensor).
        window: None (update alpha every step, Alg. 2) or the window length K in steps (eq. 10).
        momentum, weight_decay: the SGD base direction (torch.optim.SGD's heavy ball, dampening 0).
        per_tensor: one alpha per tensor (App. D.2) instead of one for all.
        eta: None for the Newton rule; a float for the fixed-eta variant of App. D.4,
            ``alpha <- max(0, alpha + eta * a)``.
        ntlr_compat: the public NTLR code's variant (needs a window; K may be 0 there, see :class:`TLR`).
        meta_gamma: NTLR's gamma (compat mode only).

    With Python-float ``lr`` and hyper-parameters, alpha is updated in Python float arithmetic (the inner products are
    read back with one host synchronisation per update) and is not differentiable; pass a tensor ``lr`` (and/or
    ``bound``, ``eta``) to differentiate through alpha's updates.
    """

    def __init__(self, lr: Scalar = 0.1, bound: Scalar = DEFAULT_BOUND, window: int | None = None,
                 momentum: float = 0.0, weight_decay: float = 0.0, per_tensor: bool = False,
                 eta: Scalar | None = None, ntlr_compat: bool = False, meta_gamma: Scalar = NTLR_GAMMA):
        if ntlr_compat and window is None:
            raise ValueError("Invalid window: ntlr_compat needs a window (the NTLR code updates once per window)")
        self.lr, self.bound, self.window = lr, bound, window
        self.momentum, self.weight_decay, self.per_tensor = momentum, weight_decay, per_tensor
        self.eta, self.ntlr_compat, self.meta_gamma = eta, ntlr_compat, meta_gamma
        self._tensor_hparams = any(isinstance(h, Tensor) for h in (bound, eta, meta_gamma))

    def init(self, params: Params) -> TLRState:
        def empty(p: Tensor) -> Tensor:
            return p.new_empty(0)

        lr = {n: self.lr for n in params} if self.per_tensor else self.lr
        return TLRState(
            lr=lr, step=0, window_pos=0, boundaries=0, negative_lr_steps=0,
            momentum_buffer={n: torch.zeros_like(p) if self.momentum != 0 else empty(p) for n, p in params.items()},
            prev_direction={n: torch.zeros_like(p) for n, p in params.items()},
            window_start={n: p.clone() if self.window is not None else empty(p) for n, p in params.items()})

    def step(self, params: Params, grads: Params, state: TLRState) -> tuple[Params, TLRState]:
        directions, bufs = {}, {}
        for n, p in params.items():
            g = with_weight_decay(grads[n], p, self.weight_decay)
            directions[n], bufs[n] = sgd_direction(g, state.momentum_buffer[n], state.step == 0, self.momentum,
                                                   0.0, False)
        if self.window is None:
            # Alg. 2: the new alpha is computed from (d_t, d_{t-1}) and applied to d_t itself.
            lr, negative = self._next_lr(state.lr, directions, state.prev_direction)
            new_params = {n: apply_update(p, directions[n], self._lr_of(lr, n)) for n, p in params.items()}
            prev = {n: _owned(directions[n], grads[n]) for n in params}
            return new_params, state._replace(lr=lr, step=state.step + 1, momentum_buffer=bufs, prev_direction=prev,
                                              negative_lr_steps=state.negative_lr_steps + negative)
        # Window mode (eq. 10): alpha is held for K steps, then updated from the window's accumulated direction.
        new_params = {n: apply_update(p, directions[n], self._lr_of(state.lr, n)) for n, p in params.items()}
        if self.ntlr_compat:
            # The NTLR counter: a boundary when the count *before* this step's increment equals K.
            boundary = state.window_pos == self.window
            pos = 1 if boundary else state.window_pos + 1
        else:
            pos = state.window_pos + 1
            boundary = pos == self.window
            pos = 0 if boundary else pos
        state = state._replace(step=state.step + 1, window_pos=pos, momentum_buffer=bufs)
        if not boundary:
            return new_params, state
        if self.ntlr_compat and state.boundaries == 0:
            # NTLR initialises its cache at the first boundary: its direction there is (w - w) / alpha = 0.
            window_dir = {n: torch.zeros_like(p) for n, p in new_params.items()}
        else:
            window_dir = {n: self._window_direction(state.window_start[n], new_params[n], self._lr_of(state.lr, n))
                          for n in new_params}
        lr, negative = self._next_lr(state.lr, window_dir, state.prev_direction)
        return new_params, state._replace(lr=lr, boundaries=state.boundaries + 1, prev_direction=window_dir,
                                          window_start=dict(new_params),
                                          negative_lr_steps=state.negative_lr_steps + negative)

    # -- pieces -----------------------------------------------------------------------------------------------------

    def _lr_of(self, lr: Scalar | dict[str, Scalar], name: str) -> Scalar:
        return lr[name] if self.per_tensor else lr

    @staticmethod
    def _window_direction(start: Tensor, now: Tensor, lr: Scalar) -> Tensor:
        """G_j = (w_start - w_now) / alpha^(j) (eq. 10, A-T4). With alpha = 0 nothing moved and G = 0 (T-7)."""
        if isinstance(lr, Tensor):
            return (start - now) / torch.where(lr == 0, torch.ones_like(lr), lr)
        return (start - now) / lr if lr != 0 else torch.zeros_like(now)

    def _next_lr(self, lr: Scalar | dict[str, Scalar], new: Params,
                 prev: Params) -> tuple[Scalar | dict[str, Scalar], int | Tensor]:
        """The updated alpha(s) from the new and previous directions, and the number of negative results."""
        return self.lr_update(lr, *self.inner_products(lr, new, prev))

    def inner_products(self, lr: Scalar | dict[str, Scalar], new: Params,
                       prev: Params) -> tuple[list[str], list[Scalar], list[Scalar]]:
        """``(names, a, ||d||²)``: per tensor ``<new, prev>`` and the squared norm the rule normalises by (zeros for
        the fixed-eta variant), as Python floats (one host read) unless a hyper-parameter or alpha is a tensor."""
        names = list(new)
        dots = [_dot(new[n], prev[n], self.ntlr_compat) for n in names]
        sq_of = prev if self.ntlr_compat else new  # NTLR normalises by the previous window's norm (A-T3)
        # The fixed-eta update needs no norm; zeros keep the bookkeeping below uniform.
        sqs = [_dot(sq_of[n], sq_of[n], self.ntlr_compat) if self.eta is None else torch.zeros_like(d)
               for n, d in zip(names, dots)]
        lrs = list(lr.values()) if self.per_tensor else [lr]
        if not self._tensor_hparams and not any(isinstance(v, Tensor) for v in lrs):
            values = _to_floats(dots + sqs)
            dots, sqs = values[:len(names)], values[len(names):]
        return names, dots, sqs

    def lr_update(self, lr: Scalar | dict[str, Scalar], names: list[str], dots: list[Scalar],
                  sqs: list[Scalar]) -> tuple[Scalar | dict[str, Scalar], int | Tensor]:
        """The updated alpha(s) from :meth:`inner_products`, and the number of negative results. Raises
        :class:`NonFiniteLearningRate` for a non-finite Python-float alpha."""
        if not self.per_tensor:
            return self._update(lr, _total(dots), _total(sqs))
        out, negative = {}, 0
        for n, a, sq in zip(names, dots, sqs):
            out[n], neg = self._update(lr[n], a, sq)
            negative = negative + neg
        return out, negative

    def _update(self, lr: Scalar, a: Scalar, sq: Scalar) -> tuple[Scalar, int | Tensor]:
        if self.ntlr_compat:
            new = _finite(lr * ntlr_factor(a, sq, self.meta_gamma), "the NTLR update")
            return new, _is_negative(new)  # faithful to the code: no clip
        if self.eta is not None:
            raw = _finite(lr + self.eta * a, "the fixed-eta update")  # App. D.4: max(0, alpha + eta <g_t, g_{t-1}>)
            new = torch.clamp(raw, min=0.0) if isinstance(raw, Tensor) else max(raw, 0.0)
            return new, _is_negative(raw)
        new = _finite(lr * (1 + newton_ratio(a, sq, self.bound)), "the TLR update")
        return new, _is_negative(new)


class _TLRFace(CoreOptimizer):
    """What the TLR faces share: logging alpha, counting and logging negative alphas, and skipping a step whose new
    alpha is not finite (nothing non-finite reaches the parameters or the state)."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, nonfinite: str):
        super().__init__(params, dict(defaults, negative_lr_steps=0), nonfinite=nonfinite)

    def _skip_nonfinite_lr(self, group: dict[str, Any], err: NonFiniteLearningRate) -> None:
        self.skip_nonfinite(group, "learning-rate update", err)

    def _log_step(self, group: dict[str, Any], negative_before: int, action: str) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: step %d lr %r", type(self).__name__, group["step"], self.learning_rates(group))
        warn_negative_rate_once(self, group, negative_before, action)

    def learning_rates(self, group: dict[str, Any]) -> float | dict[str, float]:
        """The group's alpha (``param_groups[i]["lr"]``)."""
        return group["lr"]


def resolve_window(window: int | float | None, steps_per_epoch: int | None, ntlr_compat: bool = False) -> int | None:
    """The window length K in steps: None (every step), an int K >= 1, or a fraction p in (0, 1] of an epoch of
    ``steps_per_epoch`` batches, K = max(1, floor(p N)) (A-T5); the NTLR code's int(p N), possibly 0, in compat mode.
    Raises ValueError naming the argument for anything else."""
    if steps_per_epoch is not None:
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, numbers.Integral) \
                or steps_per_epoch < 1:
            raise ValueError(f"Invalid steps_per_epoch: {steps_per_epoch!r} (expected an int >= 1)")
        if not isinstance(window, float):
            raise ValueError(f"Invalid steps_per_epoch: {steps_per_epoch!r} is only used with a fractional window "
                             f"(window: float in (0, 1]); got window={window!r}")
    if window is None:
        return None
    if isinstance(window, bool):
        raise ValueError(f"Invalid window: {window!r} (expected None, an int >= 1 or a float in (0, 1])")
    if isinstance(window, numbers.Integral):
        if window < 1:
            raise ValueError(f"Invalid window: {window!r} (a window in steps must be >= 1)")
        return int(window)
    if isinstance(window, float):
        if not 0.0 < window <= 1.0:
            raise ValueError(f"Invalid window: {window!r} (a fraction of an epoch must lie in (0, 1])")
        if steps_per_epoch is None:
            raise ValueError(f"Invalid steps_per_epoch: None; a fractional window ({window!r}) needs steps_per_epoch, "
                             "the number of batches per epoch (len(train_loader))")
        k = int(window * steps_per_epoch)  # floor: both factors are positive
        return k if ntlr_compat else max(1, k)
    raise ValueError(f"Invalid window: {window!r} (expected None, an int >= 1 or a float in (0, 1])")


class TLR(_TLRFace, ForeachFace):
    """Efficient GD-TLR (Alg. 2 of the TLR paper): the learning rate trained by a bounded Newton step.

    Every-step mode (``window=None``; Alg. 2, eqs. 7-9), with d_t the SGD direction (d_t = g_t + lambda w_t with the
    defaults momentum = weight decay = 0, i.e. the paper's plain gradient)::

        a = <d_t, d_{t-1}>,   D = 4 (||d_t||^2 - a),   d_0 = 0
        r = a / max(D, a / c)            (eq. 9; r = 0 when d_t = 0; r in (-1/4, c])
        alpha_{t+1} = alpha_t (1 + r)
        w_{t+1} = w_t - alpha_{t+1} d_t  (the new alpha applies to the current direction)

    alpha_1 = alpha_0, alpha stays positive, and alpha_0 = 0 stays 0 (T-7). With momentum > 0 (not in the paper's
    Alg. 2) the rule acts on the heavy-ball direction in place of g_t, as the window mode does (A-T6).

    Window mode (``window`` = K steps as an int, or a fraction p of an epoch as a float in (0, 1] with
    ``steps_per_epoch`` = N, K = max(1, floor(pN)), A-T5; so ``window=1`` is one step and ``window=1.0`` one epoch;
    paper §4, eq. 10): torch.optim.SGD (momentum, weight decay) runs unchanged with alpha^(j) held for K steps;
    at the end of window j, G_j = (w_start - w_now) / alpha^(j) (the accumulated update direction, momentum and weight
    decay included, A-T6), r from (G_j, G_{j-1}) by eq. 9 with G_0 = 0, alpha^(j+1) = alpha^(j) (1 + r). The new alpha
    applies to the next window: a one-window lag against Alg. 2 (A-T8, oracle T-5). Changing ``param_groups[i]["lr"]``
    (an LR scheduler) inside a window raises RuntimeError; between windows it sets the next window's alpha.

    ``per_tensor=True`` (``tlr-pl``, App. D.2): the same rule independently per tensor (weights and biases separate),
    alpha^k in ``optimizer.state[p]["lr"]``; ``param_groups[i]["lr"]`` is only their initial value and cannot change
    after the first step. Otherwise one alpha per param group, in ``param_groups[i]["lr"]`` (normally one group).

    ``eta`` (float): the fixed-meta-learning-rate variant of App. D.4,
    alpha_{t+1} = max(0, alpha_t + eta <d_t, d_{t-1}>), which is SGD-HD with its clip at 0 and beta = eta (T-6). A
    negative raw value is logged and counted in ``param_groups[i]["negative_lr_steps"]``.

    ``ntlr_compat=True`` (replication only, spec §7 / A-T3): the public NTLR code's ``tlr_wrapper.TLR``:
    alpha <- alpha (1 + gamma a / (||G_{j-1}||^2 - a + 1e-10)) with a = <G_{j-1}, G_j>, gamma = ``meta_gamma`` (0.2),
    no bound (``bound`` is ignored; alpha can even turn negative: logged and counted, not clipped), K = int(pN) (0 gives
    a single no-op update), the first boundary after K + 1 steps and then every K, and the cache initialised at the
    first boundary, so the first real change is at the third. ``tlr-pl`` with compat equals NTLR with one param group
    per tensor.

    Defaults: c = 1/4 (App. D.3: 1 + c in {5, 10} diverged on MNIST), alpha_0 = 0.1 (the paper's App. D runs; it
    reports robustness over {1e-3, 1e-2, 1e-1}). ``momentum``/``weight_decay`` default to None: 0 and 0 in
    every-step mode (Alg. 2 exactly), and the paper's App. D base, 0.8 and 5e-4, in window mode. The paper's
    experiments used window = 0.33 (p, App. D.1) with steps_per_epoch = len(train_loader).

    Memory per parameter: d_{t-1} (+n) in every-step mode; w_start and G_{j-1} (+2n) in window mode; plus the
    momentum buffer (+n) when momentum > 0. Per tensor: one float each. Cost: two dot products per update; no extra
    forward/backward pass and no Hessian-vector product.

    Every-step mode steps in place with ``torch._foreach_*`` ops (``fast=True``, the default; the rule's arithmetic bit
    for bit, tested), noticing non-finite gradients from its inner products rather than a separate pass; window mode
    and tensor-valued hyper-parameters step through :class:`TLRRule` (``fast=False`` always does).
    """

    screens_nonfinite = True

    def __init__(self, params, lr: float = 0.1, bound: float = DEFAULT_BOUND, window: int | float | None = None,
                 steps_per_epoch: int | None = None, momentum: float | None = None,
                 weight_decay: float | None = None, *, per_tensor: bool = False, eta: float | None = None,
                 ntlr_compat: bool = False, meta_gamma: float | None = None, nonfinite: str = "skip",
                 fast: bool = True):
        self.per_tensor, self.fast = per_tensor, fast
        super().__init__(params, dict(lr=lr, bound=bound, window=window, steps_per_epoch=steps_per_epoch,
                                      momentum=momentum, weight_decay=weight_decay, eta=eta, ntlr_compat=ntlr_compat,
                                      meta_gamma=meta_gamma), nonfinite=nonfinite)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_range("learning rate", group["lr"])
        compat = bool(group["ntlr_compat"])
        if not compat:
            check_range("bound", group["bound"], 0.0, low_open=True)
        group["window_steps"] = resolve_window(group["window"], group["steps_per_epoch"], compat)
        if compat and group["window_steps"] is None:
            raise ValueError("Invalid window: None; ntlr_compat needs a window (int steps or a fraction of an epoch)")
        windowed = group["window_steps"] is not None
        if group["momentum"] is None:
            group["momentum"] = PAPER_MOMENTUM if windowed else 0.0
        if group["weight_decay"] is None:
            group["weight_decay"] = PAPER_WEIGHT_DECAY if windowed else 0.0
        check_range("momentum value", group["momentum"])
        check_range("weight_decay value", group["weight_decay"])
        if group["eta"] is not None:
            if compat:
                raise ValueError("Invalid eta: the fixed-eta variant (App. D.4) cannot be combined with ntlr_compat")
            check_range("eta", group["eta"])
        if group["meta_gamma"] is None:
            group["meta_gamma"] = NTLR_GAMMA
        elif not compat:
            raise ValueError("Invalid meta_gamma: it is the NTLR code's gamma and only applies with ntlr_compat=True")
        check_range("meta_gamma", group["meta_gamma"])
        group["tensor_lr_init"] = group["lr"]
        group["window_lr"] = group["lr"]

    def rule(self, group: dict[str, Any]) -> TLRRule:
        return TLRRule(group["lr"], group["bound"], group["window_steps"], group["momentum"], group["weight_decay"],
                       self.per_tensor, group["eta"], group["ntlr_compat"], group["meta_gamma"])

    def use_rule(self, group: dict[str, Any]) -> bool:
        return (super().use_rule(group) or group["window_steps"] is not None
                or any(isinstance(group[k], Tensor) for k in ("bound", "eta", "meta_gamma")))

    def foreach_step(self, group, params, grads, state) -> bool:
        rule = self.rule(group)
        names = [str(i) for i in range(len(params))]
        directions = decayed(grads, params, group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:  # the new buffers out of place: nothing is written before alpha's update succeeded
            if group["step"] == 0:  # torch starts the buffer at the gradient
                directions = [d.clone() for d in directions]
            else:
                bufs = torch._foreach_mul([s["momentum_buffer"] for s in state], momentum)
                torch._foreach_add_(bufs, directions)
                directions = bufs
        lr = dict(zip(names, (s["lr"] for s in state))) if self.per_tensor else group["lr"]
        _, dots, sqs = rule.inner_products(lr, dict(zip(names, directions)),
                                           dict(zip(names, (s["prev_direction"] for s in state))))
        if not all(math.isfinite(v) for v in dots + sqs) and not self.check_finite(group, grads):
            return False
        lr, negative = rule.lr_update(lr, names, dots, sqs)  # NonFiniteLearningRate: step_group skips the step
        if self.per_tensor:
            for p, d, s, n in zip(params, directions, state, names):
                p.add_(d, alpha=-lr[n])
                s["lr"] = lr[n]
        else:
            torch._foreach_add_(params, directions, alpha=-lr)
            group["lr"] = lr
        if directions is grads:  # d_{t-1} must not alias the caller's gradients
            torch._foreach_copy_([s["prev_direction"] for s in state], directions)
        else:  # new tensors (heavy ball: the buffers, as the rule keeps them)
            for s, d in zip(state, directions):
                s["prev_direction"] = d
                if momentum != 0:
                    s["momentum_buffer"] = d
        group["negative_lr_steps"] += negative
        group["step"] += 1
        return True

    def step_group(self, group: dict[str, Any], grads: Params | None = None) -> bool:
        self._check_lr_unchanged(group)
        negative_before = group["negative_lr_steps"]
        try:
            done = super().step_group(group, grads)
        except NonFiniteLearningRate as err:  # raised by the rule before anything was written
            self._skip_nonfinite_lr(group, err)
            return False
        if done:
            group["window_lr"] = group["lr"]
            self._log_step(group, negative_before, "clipped to 0 (fixed eta, App. D.4)" if group["eta"] is not None
                           else "not clipped (ntlr_compat reproduces the NTLR code)")
        return done

    def learning_rates(self, group: dict[str, Any]) -> float | dict[str, float]:
        """The group's alpha, or its per-tensor alphas keyed by parameter name (``tlr-pl``)."""
        if not self.per_tensor:
            return group["lr"]
        names, params = self.named_params(group)
        return {n: self.state[p]["lr"] for n, p in zip(names, params) if "lr" in self.state[p]}

    def _check_lr_unchanged(self, group: dict[str, Any]) -> None:
        """alpha must not be changed from outside where that would corrupt the rule (see the class docstring)."""
        if self.per_tensor:
            if not any(self.state[p] for p in group["params"]):
                group["tensor_lr_init"] = group["lr"]  # before the first step the initial alpha may still change
            elif group["lr"] != group["tensor_lr_init"]:
                raise RuntimeError(
                    f"tlr-pl keeps one learning rate per tensor in optimizer.state[p]['lr']; param_groups[i]['lr'] is "
                    f"only their initial value ({group['tensor_lr_init']}) and cannot be changed after the first step "
                    f"(got {group['lr']}). Do not use an LR scheduler with tlr-pl.")
            return
        if group["lr"] != group["window_lr"] and self._inside_window(group):
            raise RuntimeError(
                f"{type(self).__name__}: param_groups[i]['lr'] changed from {group['window_lr']} to {group['lr']} "
                "inside a TLR window; G = (w_start - w_now) / alpha needs alpha constant over the window. Change it "
                "only at window boundaries (or do not use an LR scheduler with windowed TLR).")

    @staticmethod
    def _inside_window(group: dict[str, Any]) -> bool:
        k = group["window_steps"]
        if k is None:
            return False
        pos = group.get("window_pos", 0)
        if not group["ntlr_compat"]:
            return pos > 0
        # NTLR: windows run from one boundary (pos = 1 after it) to the next; before its first boundary the window
        # direction is discarded (cache initialisation), and with K = 0 there is no later boundary.
        return k > 0 and group.get("boundaries", 0) > 0 and pos != 1


# The registrations' records (metaopt.registry): test_hparams for the contract tests' least-squares problem,
# memory models at the registered defaults (tlr-naive evaluates the loss itself: no roofline).
@register_optimizer("tlr", fixed={"per_tensor": False}, kind="hypergradient", builds=TLR, test_hparams=dict(lr=0.05),
                    memory=MemoryModel(1, 2, "previous gradient; reads g, g_prev for <g, g_prev> and |g|^2 before the "
                                             "update"))
def _make_tlr(params, lr: float = 0.1, bound: float = DEFAULT_BOUND, window: int | float | None = None,
              steps_per_epoch: int | None = None, momentum: float | None = None, weight_decay: float | None = None,
              **kw: Any) -> TLR:
    return TLR(params, lr, bound, window, steps_per_epoch, momentum, weight_decay, per_tensor=False, **kw)


@register_optimizer("tlr-pl", fixed={"per_tensor": True}, kind="hypergradient", builds=TLR,
                    test_hparams=dict(lr=0.05),
                    memory=MemoryModel(1, 2, "previous gradient; reads g, g_prev for the per-tensor <g, g_prev> and "
                                             "|g|^2"))
def _make_tlr_pl(params, lr: float = 0.1, bound: float = DEFAULT_BOUND, window: int | float | None = None,
                 steps_per_epoch: int | None = None, momentum: float | None = None, weight_decay: float | None = None,
                 **kw: Any) -> TLR:
    return TLR(params, lr, bound, window, steps_per_epoch, momentum, weight_decay, per_tensor=True, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# Naive GD-TLR (Alg. 1)


class NaiveTLRState(NamedTuple):
    lr: Scalar
    step: int
    negative_lr_steps: int | Tensor


class NaiveTLRRule(FunctionalOptimizer):
    """Naive GD-TLR (Alg. 1) as a pure rule; see :class:`NaiveTLR` for the equations.

    The step needs a second gradient at the lookahead point w - alpha g on the same batch. Either give ``grad_fn``
    (params dict -> gradient dict, e.g. ``torch.func.grad`` of the batch loss, or ``torch.autograd.grad`` with
    ``create_graph=True`` to differentiate through it) and call :meth:`step`, or run the two halves yourself:
    ``ahead = rule.lookahead(params, grads, state)``, evaluate the gradient there, then
    ``rule.update(params, grads, ahead_grads, state)`` (what the ``torch.optim`` face does).
    """

    def __init__(self, lr: Scalar = 0.1, eta: Scalar = 1e-3, clip_lr_at_zero: bool = False,
                 grad_fn: Callable[[Params], Params] | None = None):
        self.lr, self.eta, self.clip_lr_at_zero, self.grad_fn = lr, eta, clip_lr_at_zero, grad_fn

    def init(self, params: Params) -> NaiveTLRState:
        return NaiveTLRState(self.lr, 0, 0)

    def lookahead(self, params: Params, grads: Params, state: NaiveTLRState) -> Params:
        """The point where Alg. 1's second pass evaluates the gradient: w_t - alpha_t g_t (eq. 2)."""
        return {n: apply_update(p, grads[n], state.lr) for n, p in params.items()}

    def update(self, params: Params, grads: Params, lookahead_grads: Params,
               state: NaiveTLRState) -> tuple[Params, NaiveTLRState]:
        """alpha_{t+1} = alpha_t + eta <g_hat, g_t> (eqs. 3, 7), then w_{t+1} = w_t - alpha_{t+1} g_t."""
        dots = [_dot(lookahead_grads[n], grads[n]) for n in params]
        if not isinstance(state.lr, Tensor) and not isinstance(self.eta, Tensor):
            dots = _to_floats(dots)
        raw = _finite(state.lr + self.eta * _total(dots), "the naive TLR update")
        lr = raw
        if self.clip_lr_at_zero:
            lr = torch.clamp(raw, min=0.0) if isinstance(raw, Tensor) else max(raw, 0.0)
        new_params = {n: apply_update(p, grads[n], lr) for n, p in params.items()}
        return new_params, NaiveTLRState(lr, state.step + 1, state.negative_lr_steps + _is_negative(raw))

    def step(self, params: Params, grads: Params, state: NaiveTLRState) -> tuple[Params, NaiveTLRState]:
        if self.grad_fn is None:
            raise ValueError("NaiveTLRRule.step needs grad_fn (the batch gradient at a parameter dict); without it "
                             "call lookahead() and update() around your own gradient evaluation")
        return self.update(params, grads, self.grad_fn(self.lookahead(params, grads, state)), state)


class NaiveTLR(_TLRFace):
    """Naive GD-TLR (Alg. 1 of the TLR paper): gradient descent on alpha through a lookahead on the same batch.

    ``step(closure)``; ``closure()`` returns the training loss on the current batch as a tensor with its graph (the
    optimizer differentiates it with ``torch.autograd.grad``; a closure that calls ``backward()`` itself also works,
    its ``p.grad`` is then used). Each step evaluates the closure exactly twice, on the same batch (A-T7)::

        g_t     = grad L_B(w_t)                             (first pass)
        g_hat   = grad L_B(w_t - alpha_t g_t)               (second pass, the lookahead of eq. 2)
        alpha_{t+1} = alpha_t + eta <g_hat, g_t>            (eq. 3 with dL_alpha/d alpha = -<g_hat, g_t>, eq. 7)
        w_{t+1} = w_t - alpha_{t+1} g_t                     (no lag: the new alpha applies to g_t)

    alpha lives in ``param_groups[i]["lr"]``; ``param_groups[i]["grad_evals"]`` counts the closure evaluations.
    ``step`` returns the loss of the first evaluation. After the step ``p.grad`` is whatever the closure left there
    (the lookahead gradient, if it calls ``backward()``).

    Defaults: alpha_0 = 0.1 (as ``tlr``). The paper recommends no eta (App. D.4 shows sensitivity over 1e-3 to 1);
    the default 1e-3 is the smallest of that grid and Baydin et al.'s SGD-HD beta, the same quantity (paper §5).
    alpha can turn negative: the paper does not clip (``clip_lr_at_zero=False``, faithful); negative values are logged
    and counted in ``param_groups[i]["negative_lr_steps"]``; ``clip_lr_at_zero=True`` clips as App. D.4 and MARTHE do.

    Memory: no per-parameter state; during a step, a copy of w and the two gradients (+3n transient). Cost: one
    extra forward and backward pass per step (spec §10).
    """

    requires_closure = True

    def __init__(self, params, lr: float = 0.1, eta: float = 1e-3, clip_lr_at_zero: bool = False, *,
                 nonfinite: str = "skip"):
        check_range("learning rate", lr)
        check_range("eta", eta)
        super().__init__(params, dict(lr=lr, eta=eta, clip_lr_at_zero=clip_lr_at_zero, grad_evals=0),
                         nonfinite=nonfinite)

    def rule(self, group: dict[str, Any]) -> NaiveTLRRule:
        return NaiveTLRRule(group["lr"], group["eta"], group["clip_lr_at_zero"])

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise RuntimeError("tlr-naive needs step(closure): closure() must return the loss on the current batch "
                               "(Alg. 1 evaluates the gradient twice on the same batch)")
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        loss, grads = self._evaluate(closure, params)
        live = []  # (group, rule, its parameters with a gradient, g, state)
        for group in self.param_groups:
            group["grad_evals"] += 1
            names, group_params = self.named_params(group)
            pairs = [(n, p) for n, p in zip(names, group_params) if grads.get(p) is not None]
            g = {n: grads[p] for n, p in pairs}
            if not g or not self.check_finite(group, g.values()):
                continue
            rule = self.rule(group)
            param_dict = dict(pairs)
            live.append((group, rule, param_dict, g, self.load_rule_state(group, rule, param_dict)))
        if not live:
            return loss
        saved = {}
        with torch.no_grad():
            for group, rule, param_dict, g, state in live:
                saved[id(group)] = {n: p.detach().clone() for n, p in param_dict.items()}
                ahead = rule.lookahead(saved[id(group)], g, state)
                for n, p in param_dict.items():
                    p.copy_(ahead[n])
        try:
            _, ahead_grads = self._evaluate(closure, params)
        except BaseException:
            with torch.no_grad():  # never leave the parameters at the lookahead point
                for group, _, param_dict, _, _ in live:
                    for n, p in param_dict.items():
                        p.copy_(saved[id(group)][n])
            raise
        with torch.no_grad():
            # Back to w_t first, so that a skipped (or raising) group is left exactly where it was.
            for group, _, param_dict, _, _ in live:
                for n, p in param_dict.items():
                    p.copy_(saved[id(group)][n])
            for group, rule, param_dict, g, state in live:
                group["grad_evals"] += 1
                g_hat = {n: ahead_grads[p] if ahead_grads.get(p) is not None else torch.zeros_like(p)
                         for n, p in param_dict.items()}
                if not self.check_finite(group, g_hat.values()):
                    continue
                negative_before = group["negative_lr_steps"]
                try:
                    new_params, new_state = rule.update(saved[id(group)], g, g_hat, state)
                except NonFiniteLearningRate as err:
                    self._skip_nonfinite_lr(group, err)
                    continue
                for n, p in param_dict.items():
                    p.copy_(new_params[n])
                self.store_rule_state(group, param_dict, new_state)
                self._log_step(group, negative_before, "clipped to 0" if group["clip_lr_at_zero"]
                               else "kept (clip_lr_at_zero=False, as Alg. 1)")
        return loss

    @staticmethod
    def _evaluate(closure: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor, dict[Tensor, Tensor | None]]:
        """One closure evaluation and the gradient of its loss for each parameter (None where it does not depend).

        If the closure ran ``backward()`` itself (some ``p.grad`` was replaced or modified), ``p.grad`` is the
        gradient (copied: the next evaluation may zero it in place); otherwise the returned loss is differentiated.
        """
        before = [(p.grad, p.grad._version if p.grad is not None else -1) for p in params]
        with torch.enable_grad():
            loss = closure()
        ran_backward = any(p.grad is not old or (p.grad is not None and p.grad._version != version)
                           for p, (old, version) in zip(params, before))
        del before
        if ran_backward:
            grads = {p: (p.grad.detach().clone() if p.grad is not None else None) for p in params}
            return (loss.detach() if isinstance(loss, Tensor) else loss), grads
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise RuntimeError("tlr-naive: closure() must return the loss as a tensor with its autograd graph "
                               "(or call loss.backward() itself)")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), dict(zip(params, grads))


register_optimizer("tlr-naive", kind="hypergradient", test_hparams=dict(lr=0.05, eta=1e-3))(NaiveTLR)
