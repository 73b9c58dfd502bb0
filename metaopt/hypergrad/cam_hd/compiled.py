"""CAM-HD's step for ``torch.compile`` (the faces' ``compile=True``): two functions of tensors, the reductions and the
update, each of which inductor fuses into a loop or two per tensor (on a CPU its C++ backend), where the eager step
(:meth:`metaopt.hypergrad.cam_hd.rule.CamHDRule.rates` and the in-place update) makes some thirty passes over the
parameters, half of them float64 copies for the dot products.

The split follows what must be known before anything is written: :func:`levels_step` reads the step's operands and
returns only small tensors — the new unit / layer / global rates, γ and ``∂L/∂γ``, each tensor's coarse-level rate, and
three numbers that say whether a gradient or a new rate is non-finite and whether a rate went below zero (the
parameter level's new rates are reduced, not written) — so the face refuses a non-finite step with nothing written,
after one host read; then :func:`adam_update` / :func:`sgd_update` recompute ``e = g ⊙ d_{t−1}`` in the same loop that
writes the new parameter-level rates, the combined rate κ, the base optimizer's state and the parameters.

Equal to :class:`~metaopt.hypergrad.cam_hd.rule.CamHDRule` within float32 rounding (fused loops sum in another order,
and ``α + c·e`` is not ``α − c·(−e)`` rounded twice), not bit for bit. Scalars that change from step to step (bias
corrections, γ, τ) are 0-dim tensors, so they need no recompilation; the configuration (levels, base, weight decay,
momentum, betas, clipping) is part of the graph. The first step (``d_0 = 0``) is the eager face's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from metaopt.hypergrad.cam_hd.gamma import update_gamma


def _decayed(p: Tensor, g: Tensor, weight_decay: float) -> Tensor:
    return g + weight_decay * p if weight_decay else g


def _adam_direction(m: Tensor, v: Tensor, bias_correction1: Tensor, bias_correction2_sqrt: Tensor,
                    eps: float) -> Tensor:
    return m / bias_correction1 / (v.sqrt() / bias_correction2_sqrt + eps)


def reductions(params: list[Tensor], grads: list[Tensor], first: list[Tensor], second: list[Tensor] | None,
               alphas: list[Tensor] | None, weight_decay: float, bias_correction1: Tensor,
               bias_correction2_sqrt: Tensor, eps: float, coef: Tensor, clip: bool, unit_rows: list[int] | None,
               sums: bool) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Per tensor, with ``g`` the gradient with weight decay and ``d = d_{t−1}`` (Adam: ``m̂/(√v̂ + ε)`` from
    ``first`` = m and ``second`` = v, the moments before this step; SGD: ``first`` holds d_{t−1}, ``second`` is None)
    and ``e = g ⊙ d``:

    - ``rows``: ``e`` summed over each dim-0 row in float64 (the unit level; where ``unit_rows`` is given);
    - ``totals``: ``⟨g, d⟩`` in float64 (layer and global levels; where ``sums``);
    - ``dots``: ``⟨e, α⟩`` in float64, and the new parameter-level rates ``α + coef·e`` (clipped at 0 with ``clip``)
      reduced to their ``sums`` (clipped) and ``mins`` (unclipped) (where ``alphas`` is given; ``coef`` = β_p·γ_p·τ_{t−1}).

    Returns ``(rows, totals, dots, new_sums, new_mins)``, lists with one entry per tensor (empty where not asked)."""
    rows, totals, dots, new_sums, new_mins = [], [], [], [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        g = _decayed(p, g, weight_decay)
        d = first[i] if second is None else _adam_direction(first[i], second[i], bias_correction1,
                                                            bias_correction2_sqrt, eps)
        e = g * d
        if unit_rows is not None:
            rows.append(e.reshape(unit_rows[i], -1).sum(1, dtype=torch.float64))
        if sums:
            totals.append((g.to(torch.float64) * d.to(torch.float64)).sum())
        if alphas is not None:
            a = alphas[i]
            dots.append((e.to(torch.float64) * a.to(torch.float64)).sum())
            new = a + coef * e
            new_mins.append(new.min())  # before clipping: a clipped rate still counts as a negative step
            new_sums.append((new.clamp(min=0.0) if clip else new).sum())
    return rows, totals, dots, new_sums, new_mins


class LevelsConfig(NamedTuple):
    """The static part of a group's step (part of the compiled graph): its levels, per-level β, ``beta_reduction``,
    clipping, δ and the γ mode, and the layout of its tensors (unit rows, first unit id, the shape that broadcasts unit
    rates over the tensor, layer id; the number of units, layers and elements)."""
    levels: tuple[str, ...]
    betas: tuple[float, ...]
    reduction: str
    clip: bool
    gamma_lr: float
    gamma_mode: str
    unit_rows: tuple[int, ...]
    unit_offset: tuple[int, ...]
    unit_views: tuple[tuple[int, ...], ...]
    layer_of: tuple[int, ...]
    num_units: int
    num_layers: int
    numel: int


def levels_step(params: list[Tensor], grads: list[Tensor], first: list[Tensor], second: list[Tensor] | None,
                alphas: list[Tensor] | None, old_unit: Tensor | None, old_layer: Tensor | None,
                old_global: Tensor | None, gamma: Tensor, tau_prev: Tensor, unit_index: Tensor, layer_index: Tensor,
                unit_size: Tensor, layer_size: Tensor, weight_decay: float, bias_correction1: Tensor,
                bias_correction2_sqrt: Tensor, eps: float, cfg: LevelsConfig) -> tuple:
    """Steps 1–5 of :class:`~metaopt.hypergrad.cam_hd.rule.CamHDRule` for a group in which every tensor has a
    gradient (``gamma``: γ_{t−1}, float64; ``tau_prev``: τ_{t−1}, float64; the old coarse rates float64, None for
    unused levels), through :func:`reductions`.

    Returns ``(unit, layer, global, gamma_grad, gamma, coarse, gamma_p, coef, checks)``: the new coarse rates (None for
    unused levels), ``∂L/∂γ``, γ_t, per tensor the coarse levels' part of α* (``Σ_k γ_k·α^{(k)}_t``, in the
    parameters' dtype, broadcastable), γ_p and β_p·γ_p·τ_{t−1} in the parameters' dtype (0 without the parameter
    level), and ``checks`` = (Σ ∂L/∂γ, the sum of every new rate and γ, 1 if some unclipped rate is below zero), float64:
    the first is non-finite when a gradient is (0·inf is NaN), the second when a rate or γ overflowed."""
    dtype, device = params[0].dtype, params[0].device
    f64 = torch.float64
    levels = cfg.levels
    k_param = levels.index("parameter") if "parameter" in levels else None
    zero = torch.zeros((), dtype=dtype, device=device)
    coef = zero if k_param is None else (cfg.betas[k_param] * gamma[k_param] * tau_prev).to(dtype)
    rows, totals, dots, new_sums, new_mins = reductions(
        params, grads, first, second, alphas, weight_decay, bias_correction1, bias_correction2_sqrt, eps, coef,
        cfg.clip, list(cfg.unit_rows) if "unit" in levels else None, "layer" in levels or "global" in levels)

    old = {"unit": old_unit, "layer": old_layer, "global": old_global}
    new: dict[str, Tensor] = {}
    terms, negative = [], []
    for k, level in enumerate(levels):
        if level == "parameter":
            terms.append(-(tau_prev * torch.stack(dots).sum()))
            negative.append(torch.stack(new_mins).min() < 0)
            continue
        if level == "unit":
            h = torch.zeros(cfg.num_units, dtype=f64, device=device).index_add(0, unit_index, torch.cat(rows))
            size: Tensor | float = unit_size
        elif level == "layer":
            h = torch.zeros(cfg.num_layers, dtype=f64, device=device).index_add(0, layer_index, torch.stack(totals))
            size = layer_size
        else:
            h = torch.stack(totals).sum()
            size = float(cfg.numel)
        h = -(tau_prev * h)
        beta = cfg.betas[k] * size if cfg.reduction == "paper_eq35" else cfg.betas[k]
        rates = old[level] - beta * gamma[k] * (h / size if cfg.reduction == "mean" else h)
        negative.append((rates < 0).any())
        terms.append((h * old[level]).sum())
        new[level] = rates.clamp(min=0.0) if cfg.clip else rates
    gamma_grad = torch.stack(terms)
    gamma_new = gamma if cfg.gamma_lr == 0 else update_gamma(gamma, gamma_grad, cfg.gamma_lr, cfg.gamma_mode)

    coarse = []
    for i in range(len(params)):  # α*'s coarse terms, fine to coarse as combine_levels adds them
        term = zero
        for k, level in enumerate(levels):
            if level == "unit":
                start = cfg.unit_offset[i]
                rate = new[level][start:start + cfg.unit_rows[i]].reshape(cfg.unit_views[i])
            elif level == "layer":
                rate = new[level][cfg.layer_of[i]]
            elif level == "global":
                rate = new[level]
            else:
                continue
            term = term + (gamma[k] * rate).to(dtype)
        coarse.append(term)
    rate_sums = [gamma_new.sum()] + [r.sum() for r in new.values()]
    if alphas is not None:
        rate_sums.append(torch.stack(new_sums).sum().to(f64))
    checks = torch.stack([gamma_grad.sum(), torch.stack(rate_sums).sum(), torch.stack(negative).any().to(f64)])
    gamma_p = zero if k_param is None else gamma[k_param].to(dtype)
    return (new.get("unit"), new.get("layer"), new.get("global"), gamma_grad, gamma_new, coarse, gamma_p, coef,
            checks)


def _rate(g: Tensor, d: Tensor, alpha: Tensor | None, coarse: Tensor, coef: Tensor, clip: bool, gamma_p: Tensor,
          tau: Tensor, rest: Tensor) -> Tensor:
    """κ for one tensor, writing the new parameter-level rates into ``alpha`` (where the level is used)."""
    rate = coarse
    if alpha is not None:
        new = alpha + coef * (g * d)
        new = new.clamp(min=0.0) if clip else new
        alpha.copy_(new)
        rate = gamma_p * new + coarse
    return tau * rate + rest


def adam_update(params: list[Tensor], grads: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                alphas: list[Tensor] | None, coarse: list[Tensor], weight_decay: float, bias_correction1_prev: Tensor,
                bias_correction2_sqrt_prev: Tensor, bias_correction1: Tensor, bias_correction2_sqrt: Tensor,
                beta1: float, beta2: float, eps: float, coef: Tensor, clip: bool, gamma_p: Tensor, tau: Tensor,
                rest: Tensor) -> None:
    """CAM-HD over Adam, in place: the new parameter-level rates (as :func:`reductions` reduced them), the combined
    rate ``κ = τ_t·(γ_p·α_p + coarse) + (1 − τ_t)·α_∞`` (``coarse``: the unit / layer / global terms per tensor,
    ``rest`` = (1 − τ_t)·α_∞), Adam's moments and ``θ ← θ − κ·m̂/(√v̂ + ε)``."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
        g = _decayed(p, g, weight_decay)
        d = _adam_direction(m, v, bias_correction1_prev, bias_correction2_sqrt_prev, eps)
        kappa = _rate(g, d, None if alphas is None else alphas[i], coarse[i], coef, clip, gamma_p, tau, rest)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.sub_(kappa / bias_correction1 * m / (v.sqrt() / bias_correction2_sqrt + eps))


def sgd_update(params: list[Tensor], grads: list[Tensor], prev: list[Tensor], bufs: list[Tensor],
               alphas: list[Tensor] | None, coarse: list[Tensor], weight_decay: float, momentum: float,
               nesterov: bool, coef: Tensor, clip: bool, gamma_p: Tensor, tau: Tensor, rest: Tensor) -> None:
    """CAM-HD over SGD / heavy ball / Nesterov (every momentum buffer exists), in place, as :func:`adam_update`:
    ``d_{t−1} ← d_t`` except for heavy ball, whose ``d_{t−1}`` is the buffer itself (the caller makes it so)."""
    for i, (p, g, d_prev) in enumerate(zip(params, grads, prev)):
        g = _decayed(p, g, weight_decay)
        kappa = _rate(g, d_prev, None if alphas is None else alphas[i], coarse[i], coef, clip, gamma_p, tau, rest)
        d = g
        if momentum:
            buf = bufs[i]
            buf.mul_(momentum).add_(g)
            d = g + momentum * buf if nesterov else buf
        p.sub_(kappa * d)
        if not momentum or nesterov:
            d_prev.copy_(d)
