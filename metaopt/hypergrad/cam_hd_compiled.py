"""CAM-HD's step for ``torch.compile`` (the faces' ``compile=True``): two functions of tensors, the reductions and the
update, each of which inductor fuses into a loop or two per tensor (on a CPU its C++ backend), where the eager step
(:meth:`metaopt.hypergrad.cam_hd.CamHDRule.rates` and the in-place update) makes some thirty passes over the
parameters, half of them float64 copies for the dot products.

The split follows what must be known before anything is written: :func:`reductions` reads the step's operands and
returns only small tensors — the unit / layer / global hypergradient sums, the parameter level's ``⟨e, α⟩`` for
``∂L/∂γ``, and the sum and minimum of the parameter level's new rates (is a rate non-finite, or below zero?) — so the
face can update γ and the coarse levels (small vectors, eagerly) and refuse a non-finite step with nothing written;
then :func:`adam_update` / :func:`sgd_update` recompute ``e = g ⊙ d_{t−1}`` in the same loop that writes the new
parameter-level rates, the combined rate κ, the base optimizer's state and the parameters.

Equal to :class:`~metaopt.hypergrad.cam_hd.CamHDRule` within float32 rounding (fused loops sum in another order, and
``α + c·e`` is not ``α − c·(−e)`` rounded twice), not bit for bit. Scalars that change from step to step (bias
corrections, γ, τ) are 0-dim tensors, so they need no recompilation; the configuration (levels, base, weight decay,
momentum, betas, clipping) is part of the graph. The first step (``d_0 = 0``) is the eager face's.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
