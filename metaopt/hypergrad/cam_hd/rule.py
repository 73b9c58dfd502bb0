"""CAM-HD as a functional, differentiable rule: its typed states, the intermediate results of a step
(:class:`CamHDHypergradients`, :class:`CamHDRates`) and :class:`CamHDRule` (paper Alg. 1; spec §6(b))."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metaopt.baselines import adam_direction, adam_moments, sgd_direction, with_weight_decay
from metaopt.core import FunctionalOptimizer, Params, check_range
from metaopt.hypergrad.cam_hd.gamma import GAMMA_MODES, update_gamma
from metaopt.hypergrad.cam_hd.layout import HYPER_DTYPE, ParamLayout
from metaopt.hypergrad.cam_hd.maths import (
    _adam_apply,
    _apply,
    combine_levels,
    decay_factor,
    level_hypergradients,
    rate_dtype,
)
from metaopt.hypergrad.cam_hd.validation import (
    BASES,
    BETA_REDUCTIONS,
    DEFAULT_LEVELS,
    Scalar,
    _check_choice,
    _check_level_betas,
    check_gamma,
    default_gamma,
    parse_levels,
)
from metaopt.numerics import dot64


class CamHDSGDState(NamedTuple):
    """State of CAM-HD over SGD / SGDN. ``None`` marks a level that is not used."""
    step: int
    gamma: Tensor                          # γ_t, (K,) float64, in ``levels`` order
    gamma_grad: Tensor                     # ∂L/∂γ at the last step, (K,) float64 (zeros before the first step)
    alpha_param: dict[str, Tensor] | None  # α^{(p)}_t, shaped like each parameter
    alpha_unit: Tensor | None              # α^{(u)}_t, (num_units,) float64
    alpha_layer: Tensor | None             # α^{(l)}_t, (num_layers,) float64
    alpha_global: Tensor | None            # α^{(g)}_t, 0-d float64
    negative_lr_steps: int | Tensor        # steps after which some level's (unclipped) rate was negative
    momentum_buffer: dict[str, Tensor]     # v_t; an empty placeholder until momentum first runs (none for SGD)
    prev_direction: dict[str, Tensor]      # d_{t−1}; zeros initially (so h_1 = 0)


class CamHDAdamState(NamedTuple):
    """State of CAM-HD over Adam; ``d_{t−1}`` is recomputed from (m, v), as Adam-HD does."""
    step: int
    gamma: Tensor
    gamma_grad: Tensor
    alpha_param: dict[str, Tensor] | None
    alpha_unit: Tensor | None
    alpha_layer: Tensor | None
    alpha_global: Tensor | None
    negative_lr_steps: int | Tensor
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


CamHDState = CamHDSGDState | CamHDAdamState

_ALPHA_FIELDS = {"parameter": "alpha_param", "unit": "alpha_unit", "layer": "alpha_layer", "global": "alpha_global"}


class CamHDHypergradients(NamedTuple):
    """Steps 1–2 of step t (:meth:`CamHDRule.hypergradients`): what the level hypergradients are made of, and them."""
    live: list[str]                     # the names with a gradient, in layout order
    effective: dict[str, Tensor]        # g_t with weight decay
    prev_directions: dict[str, Tensor]  # d_{t−1} per live name ({} where d_{t−1} = 0: the first step)
    h: dict[str, Any]                   # h^{(k)} per level, scaled by τ_{t−1} (:func:`level_hypergradients`)


class CamHDRates(NamedTuple):
    """What :meth:`CamHDRule.rates` computes for step t: every level's new rates, γ, ``∂L/∂γ`` and the rate κ_t to
    apply, before the base optimizer moves (shared by the rule's functional step and the face's in-place one)."""
    step: int                           # t
    live: list[str]                     # the names with a gradient, in layout order
    effective: dict[str, Tensor]        # g_t with weight decay
    new: dict[str, Any]                 # α^{(k)}_t per level (the form of :func:`level_rates`)
    gamma: Tensor                       # γ_t
    gamma_grad: Tensor                  # ∂L/∂γ of the step
    negative: Tensor                    # 0-d bool: some level's unclipped rate is below zero
    kappa: dict[str, Any]               # κ_t per live name (a tensor, or the Python float α_∞ when τ_t = 0)

    def state_fields(self, state: CamHDState) -> dict[str, Any]:
        """The fields every CAM-HD state shares, after this step (the base optimizer's fields are the caller's)."""
        return dict(step=self.step, gamma=self.gamma, gamma_grad=self.gamma_grad,
                    negative_lr_steps=state.negative_lr_steps + self.negative.to(torch.int64),
                    alpha_param=self.new.get("parameter"), alpha_unit=self.new.get("unit"),
                    alpha_layer=self.new.get("layer"), alpha_global=self.new.get("global"))


def level_rates(state: CamHDState, levels: Sequence[str]) -> dict[str, Any]:
    """The state's level rates keyed by level name (the form :func:`combine_levels` takes)."""
    return {level: getattr(state, _ALPHA_FIELDS[level]) for level in levels}


class CamHDRule(FunctionalOptimizer):
    r"""CAM-HD as a pure, differentiable rule (paper Alg. 1; spec §6(b)). Per step t, in this order:

    1. ``g_t`` (with L2 weight decay) and ``e_t = g_t ⊙ d_{t−1}`` (``d_0 = 0``);
    2. ``h^{(k)}`` for every level, true sign, scaled by ``τ_{t−1}`` (:func:`level_hypergradients`);
    3. ``α^{(k)}_t = α^{(k)}_{t−1} − β_k·γ_{k,t−1}·h^{(k)}`` (optionally clipped at 0);
    4. ``α*_t = Σ_k γ_{k,t−1}·α^{(k)}_t[π_k]`` (:func:`combine_levels`);
    5. ``∂L/∂γ_k = Σ_G h^{(k)}[G]·α^{(k)}_{t−1}[G]`` (pre-update α), then γ by :func:`update_gamma`;
    6. the base direction: SGD ``d_t = g_t``; SGDN ``v_t = μ·v + g_t``, ``d_t = g_t + μ·v_t`` (heavy ball:
       ``d_t = v_t``); Adam ``d_t = m̂_t/(√v̂_t + ε)`` in torch's arithmetic;
    7. ``κ_t = τ_t·α*_t + (1 − τ_t)·α_∞`` with ``τ_t = exp(−s·t)`` (``κ = α*`` when decay is off);
    8. ``θ_t = θ_{t−1} − κ_t ⊙ d_t``; ``d_prev ← d_t``.

    **Learned-γ hook.** ``step(params, grads, state, gamma=γ_t)`` takes the combination weights from the caller for
    that step: ``gamma`` (a (K,) tensor, e.g. a small network's output, may require grad) replaces the state's γ as
    ``γ_{t−1}`` in steps 3–4, the built-in δ rule of step 5 is *not* applied (the caller's network is the γ rule), and
    the returned state holds that γ. ``state.gamma_grad`` (``∂L/∂γ`` of the step) is returned either way and is a
    natural input feature for such a network, as are steps 1–2's hypergradients: :meth:`hypergradients` computes
    them and ``step(..., gamma=γ_t, hypergradients=…)`` reuses them. Everything from γ to the new parameters is
    differentiable, so a meta-loss backpropagates into the network; a tensor γ placed in the state
    (``state._replace(gamma=…)``) is differentiated through the δ updates as well (softmax mode needs γ > 0 for that:
    ``log 0`` has no derivative).

    Args:
        base: ``"sgd"`` (plain or momentum, per ``momentum``/``nesterov``) or ``"adam"``.
        lr: α_0, the initial rate of every level (float or tensor).
        hypergrad_lr: β, common to all levels, or one per level (float; tensors allowed: scalar, or one per group
            for the unit / layer levels).
        levels, gamma, gamma_lr, gamma_mode: the levels, initial weights, δ, and the γ update (see the faces).
        decay, alpha_inf: s of ``τ(t) = exp(−s·t)`` (0: off) and α_∞ (default ``lr``), A-C9.
        beta_reduction: ``"sum"`` (default), ``"mean"`` or ``"paper_eq35"`` (A-C4).
        clip_lr_at_zero: clip every level's rate at 0 after its update (A-HD3; off by default).
        momentum, nesterov: SGD momentum (0 for SGD; SGDN uses 0.9, Nesterov).
        betas, eps: Adam's.
        weight_decay: coupled L2, part of ``g`` and hence of every ``h`` (A-HD4).
        layout: the groupings of the full parameter set (the face passes a cached one); default: built in
            :meth:`init` from the parameters given there, with ``named`` and ``layer_key``.

    ``step`` may be given ``grads`` for a subset of ``params``: the others contribute 0 to every ``h``, keep their
    value and their state (as ``torch.optim`` skips parameters without a gradient).
    """

    def __init__(self, base: str = "adam", lr: Scalar = 1e-3, hypergrad_lr: Any = 1e-7,
                 levels: Sequence[str] = DEFAULT_LEVELS, gamma: Sequence[float] | Tensor | None = None,
                 gamma_lr: Scalar = 0.1, gamma_mode: str = "renorm", decay: float = 0.0,
                 alpha_inf: Scalar | None = None, beta_reduction: str = "sum", clip_lr_at_zero: bool = False,
                 momentum: float = 0.0, nesterov: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, layout: ParamLayout | None = None,
                 named: bool = True, layer_key: Callable[[str], str] | None = None):
        _check_choice("base", base, BASES)
        _check_choice("gamma_mode", gamma_mode, GAMMA_MODES)
        _check_choice("beta_reduction", beta_reduction, BETA_REDUCTIONS)
        self.levels = parse_levels(levels)
        self.gamma0 = default_gamma(self.levels) if gamma is None else gamma
        check_gamma(self.gamma0, self.levels)
        self.level_betas = _check_level_betas(hypergrad_lr, self.levels)
        check_range("gamma_lr", gamma_lr)
        check_range("decay", decay)
        self.base, self.lr, self.gamma_lr, self.gamma_mode = base, lr, gamma_lr, gamma_mode
        self.decay = float(decay)
        self.alpha_inf = lr if alpha_inf is None else alpha_inf
        self.beta_reduction, self.clip_lr_at_zero = beta_reduction, clip_lr_at_zero
        self.momentum, self.nesterov = momentum, nesterov
        (self.beta1, self.beta2), self.eps, self.weight_decay = betas, eps, weight_decay
        self.layout, self.named, self.layer_key = layout, named, layer_key

    # -- state ------------------------------------------------------------------------------------------------------

    def layout_for(self, params: Params) -> ParamLayout:
        """The layout given at construction, or the one of ``params`` (cached on the rule)."""
        if self.layout is None:
            self.layout = ParamLayout.from_params(params, named=self.named, layer_key=self.layer_key)
        return self.layout

    def init(self, params: Params) -> CamHDState:
        """Every level at α_0, γ at its initial value. ``params`` may be a subset of the layout's parameter set (the
        per-parameter fields are made for it; the group-level vectors always cover the whole layout)."""
        layout = self.layout_for(params)
        device = next(iter(params.values())).device if params else None

        def filled(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
            if isinstance(self.lr, Tensor):
                return self.lr.to(dtype=dtype, device=device).expand(shape).clone()
            return torch.full(tuple(shape), float(self.lr), dtype=dtype, device=device)

        if isinstance(self.gamma0, Tensor):
            gamma = self.gamma0.to(dtype=HYPER_DTYPE, device=device)
        else:
            gamma = torch.tensor([float(x) for x in self.gamma0], dtype=HYPER_DTYPE, device=device)
        levels = set(self.levels)
        common = dict(
            step=0, gamma=gamma, gamma_grad=torch.zeros(len(self.levels), dtype=HYPER_DTYPE, device=device),
            alpha_param=({n: filled(p.shape, rate_dtype(p.dtype)) for n, p in params.items()}
                         if "parameter" in levels else None),
            alpha_unit=filled((layout.num_units,), HYPER_DTYPE) if "unit" in levels else None,
            alpha_layer=filled((layout.num_layers,), HYPER_DTYPE) if "layer" in levels else None,
            alpha_global=filled((), HYPER_DTYPE) if "global" in levels else None,
            negative_lr_steps=0)
        if self.base == "adam":
            return CamHDAdamState(**common, exp_avg={n: torch.zeros_like(p) for n, p in params.items()},
                                  exp_avg_sq={n: torch.zeros_like(p) for n, p in params.items()})
        # The momentum buffer starts as an empty placeholder (torch's "None"): plain SGD holds only d_prev.
        return CamHDSGDState(**common, momentum_buffer={n: p.new_zeros(0) for n, p in params.items()},
                             prev_direction={n: torch.zeros_like(p) for n, p in params.items()})

    # -- one step ---------------------------------------------------------------------------------------------------

    def previous_directions(self, state: CamHDState, names: Iterable[str]) -> dict[str, Tensor]:
        """``d_{t−1}`` for ``names``: stored for SGD / SGDN, recomputed from Adam's moments (before they are updated;
        empty before the first step, where ``d_0 = 0``)."""
        if self.base != "adam":
            return {n: state.prev_direction[n] for n in names}
        if state.step == 0:
            return {}
        return {n: adam_direction(state.exp_avg[n], state.exp_avg_sq[n], state.step, self.beta1, self.beta2,
                                  self.eps) for n in names}

    def _level_beta(self, k: int, level: str, layout: ParamLayout, device: torch.device) -> Scalar:
        beta = self.level_betas[k]
        if self.beta_reduction == "paper_eq35":
            return beta * layout.group_sizes(level, device)  # eq. 35 literally: β_G = |G|·β (A-C4; replication)
        return beta

    def _mean_reduced(self, level: str, h: Any, layout: ParamLayout, device: torch.device) -> Any:
        if self.beta_reduction != "mean" or level == "parameter":
            return h
        return h / layout.group_sizes(level, device)  # "if we average h, no adjustment is needed" (A-C4)

    def step(self, params: Params, grads: Params, state: CamHDState, gamma: Tensor | None = None, *,
             hypergradients: CamHDHypergradients | None = None) -> tuple[Params, CamHDState]:
        """One CAM-HD step (class docstring). ``gamma``: optional (K,) tensor overriding the state's γ as
        ``γ_{t−1}`` for this step (the learned-γ hook; the δ update is then skipped). ``hypergradients``: steps 1–2
        already computed by :meth:`hypergradients` on these same arguments (a caller whose γ depends on them, as the
        learned γ's features do, computes them once)."""
        if not grads:
            self._check_params(params)
            return dict(params), state
        rates = self.rates(params, grads, state, gamma, hypergradients=hypergradients)
        t, live, effective, kappa = rates.step, rates.live, rates.effective, rates.kappa
        new_params = dict(params)
        common = rates.state_fields(state)
        if self.base == "adam":
            ms, vs = dict(state.exp_avg), dict(state.exp_avg_sq)
            for n in live:
                ms[n], vs[n] = adam_moments(effective[n], ms[n], vs[n], self.beta1, self.beta2)
                new_params[n] = _adam_apply(params[n], ms[n], vs[n], t, kappa[n], self.beta1, self.beta2, self.eps)
            return new_params, CamHDAdamState(**common, exp_avg=ms, exp_avg_sq=vs)
        bufs, directions = self.sgd_directions(rates, grads, state)
        for n in live:
            new_params[n] = _apply(params[n], directions[n], kappa[n])
        return new_params, CamHDSGDState(**common, momentum_buffer=bufs, prev_direction=directions)

    def sgd_directions(self, rates: CamHDRates, grads: Params, state: CamHDSGDState
                       ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The SGD / SGDN base's new momentum buffers and directions ``d_t`` (for every name; the live ones new)."""
        bufs, directions = dict(state.momentum_buffer), dict(state.prev_direction)
        for n in rates.live:
            g, buf = rates.effective[n], bufs[n]
            d, bufs[n] = sgd_direction(g, buf, buf.shape != g.shape, self.momentum, 0.0, self.nesterov)
            if d is grads[n]:
                d = d.clone()  # d_prev must not alias the caller's gradient (zero_grad / accumulation mutate it)
            directions[n] = d
        return bufs, directions

    def _check_params(self, params: Params) -> ParamLayout:
        layout = self.layout_for(params)
        if set(params) != set(layout.names):
            raise ValueError("CamHDRule.step: params must be the parameter set the layout was built for "
                             f"({len(layout.names)} tensors); got {len(params)}")
        return layout

    def coarse_step(self, coef: Tensor, h_reduced: Tensor, h: Tensor, old: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Step 3 and the ``∂L/∂γ`` term of a unit, layer or global level: ``(α_t, Σ_G h·α_{t−1}, any α_t < 0)``, the
        rates clipped at 0 with ``clip_lr_at_zero`` (``coef`` = β_k·γ_k; ``h_reduced``: h after ``beta_reduction``)."""
        rates = old - coef * h_reduced
        below = (rates < 0).any()
        return (rates.clamp(min=0.0) if self.clip_lr_at_zero else rates), (h * old).sum(), below

    def hypergradients(self, params: Params, grads: Params, state: CamHDState) -> CamHDHypergradients:
        """Steps 1–2 of a step (class docstring): the effective gradients of the names in ``grads`` and every level's
        hypergradient from ``d_{t−1}`` (h ≡ 0 at t = 1). Differentiable; ``grads`` must not be empty."""
        layout = self._check_params(params)
        t = state.step + 1
        live = [n for n in layout.names if n in grads]
        effective = {n: with_weight_decay(grads[n], params[n], self.weight_decay) for n in live}
        prev = self.previous_directions(state, live) if t > 1 else {}
        h = level_hypergradients(layout, self.levels, effective, prev, decay_factor(self.decay, t - 1))
        return CamHDHypergradients(live, effective, prev, h)

    def rates(self, params: Params, grads: Params, state: CamHDState, gamma: Tensor | None = None, *,
              hypergradients: CamHDHypergradients | None = None) -> CamHDRates:
        """Steps 1–5 and 7 of a step (class docstring): everything but the base optimizer's direction and the update,
        which :meth:`step` applies out of place and the face in place (``fast=True``) from this same result. ``grads``
        must not be empty; ``hypergradients``: steps 1–2 from :meth:`hypergradients` on these arguments (default:
        computed here)."""
        layout = self._check_params(params)
        device = next(iter(grads.values())).device
        t = state.step + 1
        if gamma is not None:
            check_gamma(gamma, self.levels)
            gamma_prev = gamma.to(HYPER_DTYPE)
        else:
            gamma_prev = state.gamma
        if hypergradients is None:
            hypergradients = self.hypergradients(params, grads, state)
        live, effective, _, h = hypergradients

        # Step 3: level rates with γ_{t−1}; step 5's ∂L/∂γ uses the rates before this update.
        old = level_rates(state, self.levels)
        new: dict[str, Any] = {}
        gamma_grad_terms = []
        negative = []
        for k, level in enumerate(self.levels):
            coef = self._level_beta(k, level, layout, device) * gamma_prev[k]
            h_k = self._mean_reduced(level, h[level], layout, device)
            if level == "parameter":
                rates = {}
                for n in layout.names:
                    if n in h_k:
                        rates[n] = old[level][n] - coef.to(old[level][n].dtype) * h_k[n]
                    else:
                        rates[n] = old[level][n]
                gamma_grad_terms.append(_sum_or_zero([dot64(h[level][n], old[level][n]) for n in h[level]],
                                                     device))
                negative.extend((r < 0).any() for r in rates.values())
                if self.clip_lr_at_zero:
                    rates = {n: r.clamp(min=0.0) for n, r in rates.items()}
            else:
                rates, term, below = self.coarse_step(coef, h_k, h[level], old[level])
                gamma_grad_terms.append(term)
                negative.append(below)
            new[level] = rates
        gamma_grad = torch.stack(gamma_grad_terms)

        # Step 5: the combination weights (the override, if any, replaces this rule).
        if gamma is not None or _is_zero(self.gamma_lr):
            gamma_new = gamma_prev
        else:
            gamma_new = update_gamma(gamma_prev, gamma_grad, self.gamma_lr, self.gamma_mode)

        # Steps 4 and 7: α*_t with γ_{t−1}, then κ_t. τ_t = 0 leaves exactly α_∞, so the step is the base optimizer's
        # own arithmetic at lr α_∞ (C-7); τ_t = 1 (decay off) leaves exactly α*.
        tau = decay_factor(self.decay, t)
        if not isinstance(self.alpha_inf, Tensor) and tau == 0.0:
            kappa = {n: self.alpha_inf for n in live}
        else:
            alpha_star = combine_levels(layout, self.levels, gamma_prev, new, params, live)
            if tau == 1.0:
                kappa = alpha_star
            else:
                kappa = {n: tau * a + (1 - tau) * self.alpha_inf for n, a in alpha_star.items()}

        return CamHDRates(t, live, effective, new, gamma_new, gamma_grad, torch.stack(negative).any(), kappa)

    def combined_lr(self, params: Params, state: CamHDState) -> dict[str, Tensor]:
        """``α* = Σ_k γ_k·α^{(k)}`` from a state (its current γ and rates), per parameter name. After a step with
        δ = 0 this is the α* that step applied; with δ > 0 it is the combination under the already-updated γ."""
        layout = self.layout_for(params)
        return combine_levels(layout, self.levels, state.gamma, level_rates(state, self.levels), params)


def _is_zero(x: Scalar) -> bool:
    return not isinstance(x, Tensor) and x == 0


def _sum_or_zero(terms: list[Tensor], device: torch.device) -> Tensor:
    total = torch.zeros((), dtype=HYPER_DTYPE, device=device)
    for term in terms:
        total = total + term
    return total
