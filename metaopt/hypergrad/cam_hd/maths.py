"""The maths of one CAM-HD step as functions (spec §6(b) steps 2 and 4, and the update): the level hypergradients,
the combined rate α*, the decay factor τ and the base optimizers' updates with a Python-float or tensor rate."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metaopt.baselines import adam_apply, adam_denominator, apply_update
from metaopt.hypergrad.cam_hd.layout import HYPER_DTYPE, ParamLayout
from metaopt.hypergrad.cam_hd.validation import Scalar
from metaopt.numerics import dot64


def level_hypergradients(layout: ParamLayout, levels: Sequence[str], grads: Mapping[str, Tensor],
                         prev_directions: Mapping[str, Tensor], tau: Scalar = 1.0) -> dict[str, Any]:
    """The true hypergradients of every level (spec §6(b) step 2, paper eq. 34 with the sign of spec §1)::

        e_t = g_t ⊙ d_{t−1}
        h^{(p)} = −τ·e_t,   h^{(k)}[G] = −τ·Σ_{p∈G} e_t[p]   (unit, layer),   h^{(g)} = −τ·Σ_p e_t[p]

    Args:
        layout: the parameter set's groupings.
        levels: which levels to compute (validated names).
        grads: ``g_t`` per name (weight decay included); a missing name contributes 0.
        prev_directions: ``d_{t−1}`` per name; a missing name contributes 0.
        tau: ``τ_{t−1}`` of the decay schedule (1 when decay is off, A-C9).

    Returns:
        ``{"parameter": {name: h_p}}`` (h_p in the gradient's dtype, only for names present in both dicts),
        ``"unit"``: (num_units,), ``"layer"``: (num_layers,) and ``"global"``: 0-d, all float64. Unit sums accumulate
        each row in float64; layer and global sums add the per-tensor float64 dot products (the global one in tensor
        order, as :func:`~metaopt.hypergrad.hd.global_hypergradient`), so ``h^{(g)} = Σ_l h^{(l)} = Σ_u h^{(u)} =
        Σ_p h^{(p)}`` up to rounding (C-6). Differentiable in ``grads``, ``prev_directions`` and ``tau``.
    """
    device = next(iter(grads.values())).device if grads else None
    want = set(levels)
    h_param: dict[str, Tensor] = {}
    rows: list[Tensor] = []
    totals: list[Tensor] = []
    zero = torch.zeros((), dtype=HYPER_DTYPE, device=device)
    for name in layout.names:
        g, d = grads.get(name), prev_directions.get(name)
        n_rows = layout.unit_rows[layout.position[name]]
        if g is None or d is None:
            if "unit" in want:
                rows.append(torch.zeros(n_rows, dtype=HYPER_DTYPE, device=device))
            totals.append(zero)
            continue
        if want & {"parameter", "unit"}:
            e = g * d
            if "parameter" in want:
                h_param[name] = -(e if _is_one(tau) else tau * e)
            if "unit" in want:
                cols = e.numel() // n_rows if n_rows else 0
                rows.append(e.reshape(n_rows, cols).sum(1, dtype=HYPER_DTYPE))
        totals.append(dot64(g, d) if want & {"layer", "global"} else zero)

    out = coarse_hypergradients(layout, levels, rows, totals, tau, device)
    if "parameter" in want:
        out["parameter"] = h_param
    return {level: out[level] for level in levels}


def coarse_hypergradients(layout: ParamLayout, levels: Sequence[str], rows: list[Tensor], totals: list[Tensor],
                          tau: Scalar, device: torch.device | None) -> dict[str, Tensor]:
    """The unit, layer and global levels of :func:`level_hypergradients` from every tensor's float64 row sums of
    ``g ⊙ d_{t−1}`` (``rows``, in layout order; zeros for a tensor without a gradient) and dot products ``⟨g, d_{t−1}⟩``
    (``totals``, likewise)."""

    def scaled(s: Tensor) -> Tensor:
        return -(s if _is_one(tau) else tau * s)

    out: dict[str, Any] = {}
    want = set(levels)
    index = layout.indices(device) if want & {"unit", "layer"} else {}
    for level in levels:
        if level == "parameter":
            continue
        if level == "unit":
            out[level] = scaled(torch.zeros(layout.num_units, dtype=HYPER_DTYPE, device=device).index_add(
                0, index["unit_index"], torch.cat(rows)))
        elif level == "layer":
            out[level] = scaled(torch.zeros(layout.num_layers, dtype=HYPER_DTYPE, device=device).index_add(
                0, index["layer_index"], torch.stack(totals)))
        else:
            total = totals[0]
            for t in totals[1:]:
                total = total + t
            out[level] = scaled(total)
    return out


def _is_one(x: Scalar) -> bool:
    return not isinstance(x, Tensor) and x == 1.0


def _unit_slice(layout: ParamLayout, name: str, rates: Tensor) -> Tensor:
    i = layout.position[name]
    start = layout.unit_offset[i]
    return rates[start:start + layout.unit_rows[i]].reshape(layout.unit_view_shape(name))


def rate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-parameter rates for parameters of ``dtype``: at least float32 (half-precision rates would
    swallow the small hypergradient steps)."""
    return torch.promote_types(dtype, torch.float32)


def combine_levels(layout: ParamLayout, levels: Sequence[str], gamma: Tensor, alphas: Mapping[str, Any],
                   params: Mapping[str, Tensor], names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """The combined learning rate ``α*[p] = Σ_k γ_k·α^{(k)}[π_k(p)]`` (spec §6(b) step 4, paper eq. 32).

    Args:
        gamma: (K,) weights in ``levels`` order (a tensor; differentiable).
        alphas: the level rates: ``"parameter"`` → {name: tensor shaped like the parameter}, ``"unit"`` →
            (num_units,), ``"layer"`` → (num_layers,), ``"global"`` → 0-d.
        params: gives each result's dtype (:func:`rate_dtype`) and the names to combine (or ``names``).

    Returns:
        ``{name: α*}`` in the rate dtype, broadcastable to the parameter: full shape when the parameter level is used,
        ``(rows, 1, …)`` with only unit-or-coarser levels, 0-d with only layer / global. Terms are added fine to
        coarse; a zero weight contributes an exact 0, so ``γ = (0, …, 0, 1)`` gives exactly ``α^{(g)}`` (C-1).
    """
    result = {}
    for name in (params if names is None else names):
        dtype = rate_dtype(params[name].dtype)
        i = layout.position[name]
        total = None
        for k, level in enumerate(levels):
            if level == "parameter":
                rate = alphas[level][name]
            elif level == "unit":
                rate = _unit_slice(layout, name, alphas[level])
            elif level == "layer":
                rate = alphas[level][layout.layer_of[i]]
            else:
                rate = alphas[level]
            term = (gamma[k].to(rate.dtype) * rate).to(dtype)
            total = term if total is None else total + term
        result[name] = total
    return result


def decay_factor(decay: float, step: int) -> float:
    """τ(t) = exp(−s·t) (paper §3.5); τ(0) = 1, and s = 0 gives τ ≡ 1 exactly (decay off). ``s = inf`` gives τ(t) = 0
    for every t ≥ 1 (C-7)."""
    if decay == 0 or step == 0:
        return 1.0
    return math.exp(-decay * step)


def _apply(param: Tensor, direction: Tensor, lr: Scalar) -> Tensor:
    """``θ − lr ⊙ d``. A Python float uses torch's ``add(alpha=−lr)`` (``torch.optim`` bit for bit); a tensor (per
    element or broadcastable) uses ``addcmul(−lr, d)``, differentiable, and for a uniform rate rounded exactly like
    ``add(alpha=−lr)`` on CPU and CUDA (one fused multiply-add; ``p − lr*d`` or ``addcmul(value=−1)`` round twice on
    CUDA), which is what makes C-1 bit for bit."""
    if isinstance(lr, Tensor):
        return param.addcmul(-lr.to(param.dtype), direction)
    return apply_update(param, direction, lr)


def _adam_apply(param: Tensor, m: Tensor, v: Tensor, step: int, lr: Scalar, beta1: float, beta2: float,
                eps: float) -> Tensor:
    """Adam's update with a Python-float rate (torch's arithmetic via :func:`adam_apply`) or a tensor rate
    ``θ − (κ/bc1) ⊙ m / denom`` (differentiable). torch's ``addcdiv(m, denom, value=−s)`` rounds as ``(−s·m)/denom``
    on CPU but as ``−s·(m/denom)`` on CUDA; the tensor path mirrors each, so a uniform rate reproduces Adam bit for
    bit on both (C-1). ``κ/bc1`` divides by a tensor on the parameter's device: CUDA replaces division by a Python
    scalar with multiplication by its reciprocal, which can differ from torch's Python-float ``lr/bc1`` in the last
    bit."""
    if isinstance(lr, Tensor):
        denom = adam_denominator(v, step, beta2, eps)
        step_size = lr.to(param.dtype) / param.new_tensor(1 - beta1**step)
        if param.device.type == "cuda":
            return param.addcmul(-step_size, m / denom)
        return param.addcdiv(-step_size * m, denom)
    return adam_apply(param, m, v, step, lr, beta1, beta2, eps)

