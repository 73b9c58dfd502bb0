"""CAM-HD: combined adaptive multi-level hypergradient descent (``specs/hypergradient.md`` §6; paper
``papers/cam-hd-long.txt``, Algorithm 1 and eqs. 31–38; Jie et al., arXiv 2008.07277 / IJMLC 2022).

No public implementation of CAM-HD exists; this module is the reference one. It owns:

- :class:`ParamLayout` — the level groupings of one parameter set (parameter / unit / layer / global), computed once
  as segment ids so that every level's hypergradient is an O(n) segment sum (``index_add``), with no Python loop over
  units;
- :func:`level_hypergradients` — ``h^{(k)}`` for every level from ``g_t ⊙ d_{t−1}`` (spec §6(b) step 2);
- :func:`combine_levels` — ``α*[p] = Σ_k γ_k·α^{(k)}[π_k(p)]`` (step 4);
- :func:`update_gamma` — the combination-weight step in ``renorm`` or ``softmax`` mode (step 5);
- the functional, differentiable rule :class:`CamHDRule` (SGD, SGD with Nesterov/heavy-ball momentum, Adam bases),
  whose ``step`` accepts a per-step tensor ``γ`` (the hook a learned-γ rule uses), and the ``torch.optim`` faces
  :class:`CamHDSGD`, :class:`CamHDSGDN`, :class:`CamHDAdam`, registered as ``cam-hd-sgd``, ``cam-hd-sgdn`` and
  ``cam-hd-adam``.

Conventions (spec §1): steps t = 1, 2, …; ``g_t = ∇f_t(θ_{t−1})`` includes coupled L2 weight decay; ``d_t`` is the base
optimizer's direction and ``θ_t = θ_{t−1} − κ_t ⊙ d_t``; ``h`` is the TRUE hypergradient ``∂f_t/∂α_{t−1}`` (the paper's
Alg. 1 has the opposite sign, A-C1), so with ``d_0 = 0`` every level has ``α_1 = α_0``.

Decisions where the paper and spec leave room (each also noted where it is implemented):

- Levels are an ordered subset of ``("parameter", "unit", "layer", "global")`` (fine to coarse; ``"param"`` and
  ``"filter"`` are accepted aliases). Layer = all parameters of one ``nn.Module`` (name prefix before the last ``.``);
  unit / filter = row / output channel j (dim 0) of a tensor together with ``bias[j]`` of the same module (A-C8).
- Per-level β (A-C4): sum-reduced ``h`` and a common β by default (the exact chain-rule derivatives, which makes C-1
  exact); ``beta_reduction="mean"`` (β per group = β/|G|) and ``"paper_eq35"`` (β per group = |G|·β, eq. 35 read
  literally; replication only).
- ``∂L/∂γ_k`` always uses the true, sum-reduced ``h^{(k)}`` (τ-scaled) and the pre-update ``α^{(k)}_{t−1}`` (A-C2,
  A-C7), whatever ``beta_reduction`` is.
- ``τ(t) = exp(−s·t)`` scales the hypergradients by ``τ_{t−1}`` (chain rule through κ, A-C9); ``α_∞ = lr`` by default.
- The group-level state (γ, ``∂L/∂γ``, the unit / layer / global rates) is float64, like HD's Python-float α, and the
  per-tensor sums behind the layer and global hypergradients are the float64 dot products of
  :func:`metaopt.hypergrad.hd.global_hypergradient`; so the global level is Adam-HD / SGD-HD bit for bit (C-1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metaopt.baselines import (
    adam_apply,
    adam_denominator,
    adam_foreach_denominator,
    adam_direction,
    adam_moments,
    apply_update,
    sgd_direction,
    with_weight_decay,
)
from metaopt.compiling import check_compile, compiled_step
from metaopt.core import CoreOptimizer, FunctionalOptimizer, Params, all_finite, check_betas, check_range
from metaopt.hypergrad.cam_hd_compiled import LevelsConfig, adam_update, levels_step, sgd_update
from metaopt.hypergrad.cam_hd_gamma import GAMMA_MODES, update_gamma
from metaopt.hypergrad.hd import warn_negative_rate_once
from metaopt.numerics import dot64
from metaopt.registry import MemoryModel, register_optimizer

logger = logging.getLogger(__name__)

Scalar = float | Tensor

LEVELS = ("parameter", "unit", "layer", "global")
LEVEL_ALIASES = {"param": "parameter", "filter": "unit"}
DEFAULT_LEVELS = ("parameter", "layer", "global")
DEFAULT_GAMMA = (0.3, 0.3, 0.4)          # the paper's 3-level FFNN experiment (γ_p, γ_l, γ_g)
DEFAULT_GAMMA_2_LEVEL = (0.2, 0.8)       # the paper's 2-level experiments (γ_l or γ_filter, γ_g), A-C10
BETA_REDUCTIONS = ("sum", "mean", "paper_eq35")
BASES = ("sgd", "adam")

# The small per-level vectors (γ, the unit / layer / global rates) are float64 whatever the parameters' dtype.
HYPER_DTYPE = torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# Validation shared by the rule and the faces


def parse_levels(levels: Iterable[str]) -> tuple[str, ...]:
    """Validate ``levels`` (an ordered, duplicate-free, non-empty subset of :data:`LEVELS`, fine to coarse) and
    resolve the aliases ``"param"`` and ``"filter"``. Raises ``ValueError`` naming the argument."""
    if isinstance(levels, str):
        raise ValueError(f"Invalid levels: {levels!r} (expected a sequence of level names, e.g. {DEFAULT_LEVELS})")
    resolved = tuple(LEVEL_ALIASES.get(level, level) for level in levels)
    unknown = [level for level in resolved if level not in LEVELS]
    if unknown:
        raise ValueError(f"Invalid levels: unknown level {unknown[0]!r} (expected names from {LEVELS})")
    if not resolved:
        raise ValueError("Invalid levels: at least one level is required")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"Invalid levels: {tuple(levels)!r} repeats a level")
    order = [LEVELS.index(level) for level in resolved]
    if order != sorted(order):
        raise ValueError(f"Invalid levels: {tuple(levels)!r} must be ordered fine to coarse as in {LEVELS}")
    return resolved


def default_gamma(levels: Sequence[str]) -> tuple[float, ...]:
    """The paper's initial combination weights for its two configurations, uniform weights otherwise."""
    if tuple(levels) == DEFAULT_LEVELS:
        return DEFAULT_GAMMA
    if len(levels) == 2 and levels[-1] == "global":
        return DEFAULT_GAMMA_2_LEVEL
    return tuple(1.0 / len(levels) for _ in levels)


def check_gamma(gamma: Sequence[float] | Tensor, levels: Sequence[str]) -> None:
    """γ has one weight per level; Python-number weights must be finite, ≥ 0 and sum to 1 (within 1e-6).
    Tensor γ (a learned rule's output) is only checked for its shape."""
    if isinstance(gamma, Tensor):
        if gamma.shape != (len(levels),):
            raise ValueError(f"Invalid gamma: shape {tuple(gamma.shape)} does not match the {len(levels)} levels "
                             f"{tuple(levels)}")
        return
    gamma = tuple(float(x) for x in gamma)
    if len(gamma) != len(levels):
        raise ValueError(f"Invalid gamma: {gamma!r} has {len(gamma)} weights for the {len(levels)} levels "
                         f"{tuple(levels)}")
    if not all(math.isfinite(x) and x >= 0 for x in gamma):
        raise ValueError(f"Invalid gamma: {gamma!r} (weights must be finite and >= 0)")
    if abs(sum(gamma) - 1.0) > 1e-6:
        raise ValueError(f"Invalid gamma: {gamma!r} sums to {sum(gamma)!r} (the combination weights must sum to 1)")


def _check_level_betas(hypergrad_lr: Any, levels: Sequence[str]) -> tuple[Scalar, ...]:
    """``hypergrad_lr``: one β for every level, or one per level (a Python number, or — in the functional rule — a
    tensor: a scalar, or for the unit / layer levels one β per group)."""
    if isinstance(hypergrad_lr, (int, float, Tensor)):
        betas = tuple(hypergrad_lr for _ in levels)
    else:
        betas = tuple(hypergrad_lr)
        if len(betas) != len(levels):
            raise ValueError(f"Invalid hypergrad_lr: {len(betas)} values for the {len(levels)} levels "
                             f"{tuple(levels)} (give one β, or one per level)")
    for level, beta in zip(levels, betas):
        if isinstance(beta, Tensor):
            if level in ("parameter", "global") and beta.numel() != 1:
                raise ValueError(f"Invalid hypergrad_lr: the {level} level takes a scalar β")
        else:
            check_range("hypergrad_lr", beta)
    return tuple(float(b) if isinstance(b, int) else b for b in betas)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {choices})")


# ----------------------------------------------------------------------------------------------------------------------
# Level groupings


def module_prefix(name: str) -> str:
    """The default layer key (A-C8): the owning module's name, i.e. the parameter name before its last ``.``
    (``"features.0.weight"`` → ``"features.0"``; a top-level ``"weight"`` → ``""``, the root module)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def _split_name(name: str) -> tuple[str, str]:
    return (name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]) if "." in name else ("", name)


class ParamLayout:
    """The level groupings of one ordered parameter set, computed once (spec §6 "Levels", A-C8).

    - **layer**: all tensors with the same ``layer_key(name)`` (default :func:`module_prefix`: one ``nn.Module``,
      weight and bias together). Without names (``named=False``, e.g. ``model.parameters()``) each tensor is a layer.
    - **unit** (filter): row j along dim 0 of each tensor — output unit j of a ``Linear`` weight, output channel
      (filter) j of a ``Conv`` weight, channel j of a ``BatchNorm`` scale — together with element j of the module's
      matching 1-D bias (``<module>.bias`` ↔ ``<module>.weight``, more generally the leaf name with ``bias`` replaced
      by ``weight``: ``bias_ih_l0`` ↔ ``weight_ih_l0``) when its length equals the weight's dim 0. Any other 1-D tensor
      is on its own: each of its elements is a unit (it is its own set of output rows). A 0-d tensor is one unit.
      (``ConvTranspose`` weights keep their *input* channels on dim 0; pass such models' own groupings via a custom
      layout if filter-level rates on them matter.)
    - **global**: everything; **parameter**: every element.

    Every tensor covers a contiguous range of unit ids ``[unit_offset, unit_offset + unit_rows)`` (a matched bias
    shares its weight's range), so gathering a tensor's unit rates is a slice, and the unit / layer hypergradients are
    one ``index_add`` each over precomputed segment ids (:meth:`indices`). Groups are numbered in order of first
    appearance.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], *, named: bool = True,
                 layer_key: Callable[[str], str] | None = None):
        self.names = tuple(names)
        self.shapes = tuple(torch.Size(s) for s in shapes)
        if len(self.names) != len(self.shapes):
            raise ValueError("ParamLayout: one shape per name is required")
        if len(set(self.names)) != len(self.names):
            raise ValueError("ParamLayout: parameter names must be unique")
        self.position = {n: i for i, n in enumerate(self.names)}
        self.numels = tuple(s.numel() for s in self.shapes)
        self.numel = sum(self.numels)

        key = layer_key or module_prefix
        layer_ids: dict[Any, int] = {}
        self.layer_of = tuple(layer_ids.setdefault(key(n) if named else i, len(layer_ids))
                              for i, n in enumerate(self.names))
        self.layer_keys = tuple(layer_ids)
        self.num_layers = len(layer_ids)

        self.unit_rows = tuple(s[0] if len(s) else 1 for s in self.shapes)
        shares_with: dict[int, int] = {}  # bias position -> weight position
        if named:
            for i, n in enumerate(self.names):
                prefix, leaf = _split_name(n)
                if len(self.shapes[i]) != 1 or "bias" not in leaf:
                    continue
                weight = leaf.replace("bias", "weight")
                j = self.position.get(f"{prefix}.{weight}" if prefix else weight)
                if (j is not None and j != i and len(self.shapes[j]) >= 1 and self.shapes[j][0] == self.shapes[i][0]
                        and self.layer_of[j] == self.layer_of[i]):
                    shares_with[i] = j
        offsets, next_unit = [0] * len(self.names), 0
        for i in range(len(self.names)):
            if i not in shares_with:
                offsets[i], next_unit = next_unit, next_unit + self.unit_rows[i]
        for i, j in shares_with.items():
            offsets[i] = offsets[j]
        self.unit_offset = tuple(offsets)
        self.num_units = next_unit
        self.shared_bias = dict(shares_with)
        self._by_device: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def from_params(cls, params: Mapping[str, Tensor], *, named: bool = True,
                    layer_key: Callable[[str], str] | None = None) -> ParamLayout:
        """The layout of a dict of tensors, in its iteration order."""
        return cls(list(params), [p.shape for p in params.values()], named=named, layer_key=layer_key)

    def signature(self) -> tuple:
        return self.names, self.shapes

    def num_groups(self, level: str) -> int:
        return {"parameter": self.numel, "unit": self.num_units, "layer": self.num_layers, "global": 1}[level]

    def indices(self, device: torch.device | str | None) -> dict[str, Tensor]:
        """Segment ids and group sizes on ``device`` (built once per device):

        - ``unit_index``: for the concatenation of every tensor's per-row sums (in layout order), the unit id of each
          row (length ``Σ unit_rows``);
        - ``layer_index``: the layer id of each tensor (length = number of tensors);
        - ``unit_size`` / ``layer_size`` (float64): the number of elements in each unit / layer.
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        cached = self._by_device.get(device)
        if cached is None:
            unit_index = torch.cat([torch.arange(o, o + r, dtype=torch.long) for o, r in
                                    zip(self.unit_offset, self.unit_rows)]) if self.names else \
                torch.zeros(0, dtype=torch.long)
            cols = torch.cat([torch.full((r,), float(n // r if r else 0), dtype=HYPER_DTYPE)
                              for n, r in zip(self.numels, self.unit_rows)]) if self.names else \
                torch.zeros(0, dtype=HYPER_DTYPE)
            layer_index = torch.tensor(self.layer_of, dtype=torch.long)
            unit_size = torch.zeros(self.num_units, dtype=HYPER_DTYPE).index_add(0, unit_index, cols)
            layer_size = torch.zeros(self.num_layers, dtype=HYPER_DTYPE).index_add(
                0, layer_index, torch.tensor(self.numels, dtype=HYPER_DTYPE))
            cached = {"unit_index": unit_index.to(device), "layer_index": layer_index.to(device),
                      "unit_size": unit_size.to(device), "layer_size": layer_size.to(device)}
            self._by_device[device] = cached
        return cached

    def group_sizes(self, level: str, device: torch.device | str | None) -> Tensor | float:
        """|G| for every group of ``level`` (1 for the parameter level, n for the global level)."""
        if level == "parameter":
            return 1.0
        if level == "global":
            return float(self.numel)
        return self.indices(device)[f"{level}_size"]

    def unit_view_shape(self, name: str) -> tuple[int, ...]:
        """The shape that broadcasts a tensor's unit rates (one per dim-0 row) over the tensor."""
        shape = self.shapes[self.position[name]]
        return (shape[0],) + (1,) * (len(shape) - 1) if len(shape) else ()


# ----------------------------------------------------------------------------------------------------------------------
# The maths of one step, as functions (spec §6(b) steps 2, 4, 5)


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


# ----------------------------------------------------------------------------------------------------------------------
# The functional rule


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


def _rate_tensors(gamma: Tensor, rates: Mapping[str, Any]) -> list[Tensor]:
    """γ and every level's rates (a tensor, or a dict of per-tensor rates) as one list, for one finiteness read."""
    tensors = [gamma]
    for level in rates.values():
        tensors.extend(level.values() if isinstance(level, dict) else [level])
    return tensors


def _is_zero(x: Scalar) -> bool:
    return not isinstance(x, Tensor) and x == 0


def _sum_or_zero(terms: list[Tensor], device: torch.device) -> Tensor:
    total = torch.zeros((), dtype=HYPER_DTYPE, device=device)
    for term in terms:
        total = total + term
    return total


# ----------------------------------------------------------------------------------------------------------------------
# torch.optim faces


class CamHD(CoreOptimizer):
    r"""Combined adaptive multi-level hypergradient descent (CAM-HD) — the shared ``torch.optim`` face.

    Use the registered variants :class:`CamHDSGD` (``cam-hd-sgd``), :class:`CamHDSGDN` (``cam-hd-sgdn``) and
    :class:`CamHDAdam` (``cam-hd-adam``); the maths is :class:`CamHDRule`.

    Paper: *Adaptive hierarchical hyper-gradient descent* (``papers/cam-hd-long.txt``), Algorithm 1; spec §6. Each
    level k ∈ {parameter, unit/filter, layer, global} has its own hypergradient-adapted rates α^{(k)}; the applied
    rate is their convex combination (eq. 32) and the weights γ are learned too::

        h^{(k)}[G] = −τ_{t−1}·Σ_{p∈G} g_t[p]·d_{t−1}[p]                  (eq. 34, true sign, A-C1)
        α^{(k)}_t  = α^{(k)}_{t−1} − β_k·γ_{k,t−1}·h^{(k)}               (Alg. 1)
        α*_t[p]    = Σ_k γ_{k,t−1}·α^{(k)}_t[π_k(p)]                      (eq. 32)
        ∂L/∂γ_k    = Σ_G h^{(k)}[G]·α^{(k)}_{t−1}[G];  γ_t = renorm(γ − δ·∂L/∂γ) or softmax on logits
        κ_t        = τ_t·α*_t + (1 − τ_t)·α_∞,  τ_t = exp(−s·t)            (§3.5, Thm. 2–3)
        θ_t        = θ_{t−1} − κ_t ⊙ d_t                                   (d_t: the SGD / SGDN / Adam direction)

    Where the state lives: ``param_groups[i]["gamma"]`` is the current γ (a list of floats, ``levels`` order) and
    ``param_groups[i]["gamma_grad"]`` the last ``∂L/∂γ``; ``param_groups[i]["alpha_unit"]`` / ``["alpha_layer"]`` are
    lists of floats and ``["alpha_global"]`` a float (``None`` for unused levels), so ``state_dict()`` round-trips
    them exactly; the parameter-level rates are ``optimizer.state[p]["alpha_param"]``. ``param_groups[i]["lr"]`` stays
    α_0 (the rates' initial value; also α_∞ unless ``alpha_inf`` is given); an LR scheduler that changes it scales
    every level's rate by the same factor (:meth:`_follow_lr_schedule`). :meth:`combined_lr` gives α* per
    parameter. Pass ``model.named_parameters()`` so that layers and units follow the modules; with plain
    ``parameters()`` each tensor is a layer.

    Args (common to the variants):
        lr: α_0 for every level (paper: 1e-3; 0.1 for its ResNet-18 SGD/SGDN runs).
        hypergrad_lr: β — one for all levels, or a sequence with one per level.
        levels: an ordered subset of ``("parameter", "unit", "layer", "global")``; default the paper's 3-level
            ``("parameter", "layer", "global")``; its 2-level runs are ``("unit", "global")`` (filter + global) or
            ``("layer", "global")``.
        gamma: initial weights in ``levels`` order, ≥ 0, summing to 1. Default (0.3, 0.3, 0.4) for the 3-level
            default (paper FFNN), (0.2, 0.8) for a 2-level set ending in global (paper LeNet-5 / ResNet-18, A-C10),
            uniform otherwise.
        gamma_lr: δ ≥ 0 (0 keeps γ fixed exactly).
        gamma_mode: ``"renorm"`` (Alg. 1: clamp at 0 and renormalise; the previous γ is kept if all clamp to 0) or
            ``"softmax"`` (descent on logits; γ stays > 0).
        decay: s ≥ 0 of ``τ(t) = exp(−s·t)`` (paper 0.001–0.002 for its CNNs); 0 (default) turns the decay off;
            ``math.inf`` gives the base optimizer at α_∞ from the first step.
        alpha_inf: α_∞, the rate κ tends to (default: the group's ``lr``, A-C9).
        weight_decay: coupled L2 (part of ``g`` and of every ``h``, A-HD4).
        beta_reduction: ``"sum"`` (default: sum-reduced h, one β, the exact derivatives), ``"mean"`` (β per group
            β/|G|, i.e. mean-reduced h) or ``"paper_eq35"`` (β per group |G|·β, eq. 35 read literally: β_l = n_l·β,
            β_g = n·β; for replication only — it multiplies the global step by n), A-C4.
        clip_lr_at_zero: clip every level's rate at 0 after its update (A-HD3; off by default, as HD). Steps after
            which some level's rate was negative (before clipping) are counted in
            ``param_groups[i]["negative_lr_steps"]`` and logged once.
        layer_key: ``name → layer id`` to regroup layers (default: the owning module, :func:`module_prefix`).
        nonfinite: ``"skip"`` or ``"raise"`` for non-finite gradients — and for a step whose rates or γ would become
            non-finite (see :class:`~metaopt.core.CoreOptimizer`).
        fast: apply the step in place (default): the rule's rates, then the base optimizer's update with in-place
            and ``torch._foreach_*`` ops, bit for bit with ``fast=False``, which steps through :class:`CamHDRule` and
            copies its new parameters back.
        compile: ``True`` (or a torch.compile mode) runs the steps after the first through ``torch.compile``
            (:mod:`metaopt.hypergrad.cam_hd_compiled`: one fused pass that reduces, one that updates); equal to the
            rule within float32 rounding. The first step of each shape compiles (seconds; inductor caches the code on
            disk). Groups whose tensors differ in dtype or device, or hold an empty tensor, step eagerly.

    Memory per parameter: α_p (+n, when the parameter level is used) and d_{t−1} (+n) for SGD; + momentum buffer (+n)
    for SGDN; Adam's m, v (+2n) and no d_{t−1} (recomputed from m and v, as Adam-HD). Transient: α* (n). The unit /
    layer / global rates add one float64 per group. Work: O(n) elementwise plus two segment sums per step; no extra
    forward/backward pass, no Hessian-vector product.
    """

    base = "sgd"

    def __init__(self, params: Iterable[Any], lr: float, hypergrad_lr: float | Sequence[float], *,
                 levels: Sequence[str], gamma: Sequence[float] | None, gamma_lr: float, gamma_mode: str,
                 decay: float, alpha_inf: float | None, weight_decay: float, beta_reduction: str,
                 clip_lr_at_zero: bool, layer_key: Callable[[str], str] | None, nonfinite: str, fast: bool,
                 compile: bool | str, **base_hparams: Any):
        check_range("learning rate", lr)
        levels = parse_levels(levels)
        gamma = default_gamma(levels) if gamma is None else tuple(float(x) for x in gamma)
        check_gamma(gamma, levels)
        betas = _check_level_betas(hypergrad_lr, levels)
        check_range("gamma_lr", gamma_lr)
        _check_choice("gamma_mode", gamma_mode, GAMMA_MODES)
        check_range("decay", decay)
        if alpha_inf is not None:
            check_range("alpha_inf", alpha_inf)
        check_range("weight_decay value", weight_decay)
        _check_choice("beta_reduction", beta_reduction, BETA_REDUCTIONS)
        if beta_reduction == "paper_eq35":
            logger.warning("%s: beta_reduction='paper_eq35' scales β by the group size (β_l = n_l·β, β_g = n·β, "
                           "eq. 35 read literally); this is a replication preset, not the exact derivative (A-C4).",
                           type(self).__name__)
        check_compile(compile, fast)
        self.layer_key, self.fast, self.compile = layer_key, bool(fast), compile
        self._layouts: dict[tuple, ParamLayout] = {}
        hypergrad_lr = hypergrad_lr if isinstance(hypergrad_lr, (int, float)) else tuple(float(b) for b in betas)
        super().__init__(params, dict(lr=lr, hypergrad_lr=hypergrad_lr, levels=levels, gamma=gamma,
                                      gamma_lr=gamma_lr, gamma_mode=gamma_mode, decay=decay, alpha_inf=alpha_inf,
                                      weight_decay=weight_decay, beta_reduction=beta_reduction,
                                      clip_lr_at_zero=clip_lr_at_zero, negative_lr_steps=0, **base_hparams),
                         nonfinite=nonfinite)

    # -- the rule ---------------------------------------------------------------------------------------------------

    def layout(self, group: dict[str, Any]) -> ParamLayout:
        """The group's :class:`ParamLayout`, computed once per parameter set (names and shapes)."""
        names, params = self.named_params(group)
        named = bool(group.get("param_names"))
        key = (named, tuple(names), tuple(p.shape for p in params))
        layout = self._layouts.get(key)
        if layout is None:
            layout = ParamLayout(names, [p.shape for p in params], named=named, layer_key=self.layer_key)
            self._layouts[key] = layout
        return layout

    def base_hparams(self, group: dict[str, Any]) -> dict[str, Any]:
        """The base optimizer's arguments of :class:`CamHDRule` (overridden per variant)."""
        return {}

    def rule(self, group: dict[str, Any]) -> CamHDRule:
        hypergrad_lr = group["hypergrad_lr"]
        return CamHDRule(self.base, group["lr"], hypergrad_lr if isinstance(hypergrad_lr, (int, float))
                         else tuple(hypergrad_lr), tuple(group["levels"]), tuple(group["gamma"]),
                         group["gamma_lr"], group["gamma_mode"], group["decay"], group["alpha_inf"],
                         group["beta_reduction"], group["clip_lr_at_zero"], weight_decay=group["weight_decay"],
                         layout=self.layout(group), **self.base_hparams(group))

    # -- the step ---------------------------------------------------------------------------------------------------

    def step_group(self, group: dict[str, Any], grads: Params | None = None) -> bool:
        """One CAM-HD step for a group. Unlike the generic face, the rule sees the group's *whole* parameter set (the
        level groupings are over it); parameters without a gradient contribute 0 and are left untouched.

        With ``fast=True`` (the default) the rule computes the step's rates (:meth:`CamHDRule.rates`) and the face
        applies them in place (:meth:`_apply_in_place`); from the second step on it screens the gradients through
        ``∂L/∂γ`` instead of a separate pass (every entry sums ``g ⊙ d_{t−1}`` over all tensors, and 0·inf is NaN)."""
        self._follow_lr_schedule(group)
        screened = self.fast and group.get("step", 0) > 0
        if screened and self.compile is not False and grads is None:
            stepped = self._compiled_step(group)
            if stepped is not None:
                return stepped
        gathered = self.gather(group, grads, check=not screened)
        if gathered is None:
            return False
        names, params, grads = gathered
        param_dict = dict(zip(names, params))
        rule = self.rule(group)
        state = self.load_rule_state(group, rule, param_dict)
        if self.fast:
            rates = rule.rates(param_dict, grads, state)
            # One host read where all is finite (the usual step); otherwise the two checks say which was not
            if not all_finite([rates.gamma_grad] * screened + _rate_tensors(rates.gamma, rates.new)):
                if screened and not all_finite([rates.gamma_grad]) and not self.check_finite(group, grads.values()):
                    return False
                if not self._rates_finite(group, rates.gamma, rates.new):
                    return False
            new_state = self._apply_in_place(rule, rates, param_dict, grads, state)
        else:
            new_params, new_state = rule.step(param_dict, grads, state)
            if not self._rates_finite(group, new_state.gamma, level_rates(new_state, group["levels"])):
                return False
            for n in grads:
                param_dict[n].copy_(new_params[n])
        negative_before = group.get("negative_lr_steps", 0)
        self.store_rule_state(group, param_dict, new_state)
        logger.debug("%s: step %d gamma %r alpha_global %r alpha_layer %r", type(self).__name__, group["step"],
                     group["gamma"], group["alpha_global"], group["alpha_layer"])
        warn_negative_rate_once(self, group, negative_before, "clipped to 0" if group["clip_lr_at_zero"]
                                else "kept (clip_lr_at_zero=False)")
        return True

    def _follow_lr_schedule(self, group: dict[str, Any]) -> None:
        """An LR scheduler (or a user) that changed ``param_groups[i]["lr"]`` since the last step scales every level's
        current rate by the same factor, new / old: the schedule multiplies the hypergradient-adapted rates as it
        multiplies SGD's one rate (``LambdaLR``'s λ_t then scales them by λ_t overall), and α_∞ follows ``lr`` as
        before. The last ``lr`` the face stepped with is ``param_groups[i]["lr_seen"]``; tensor-valued rates (the
        learned γ rule's face) are left to their owner."""
        lr, seen = group["lr"], group.get("lr_seen", group["lr"])
        group["lr_seen"] = lr
        numbers = (int, float)
        if not (isinstance(lr, numbers) and isinstance(seen, numbers)) or lr == seen or group.get("step", 0) == 0:
            return  # types first: comparing a tensor rate would read it back
        factor = lr / seen
        for field in ("alpha_unit", "alpha_layer"):
            if group.get(field) is not None:
                group[field] = [a * factor for a in group[field]]
        if group.get("alpha_global") is not None:
            group["alpha_global"] = group["alpha_global"] * factor
        for p in group["params"]:
            rates = self.state[p].get("alpha_param")
            if rates is not None:
                rates.mul_(factor)

    def _rates_finite(self, group: dict[str, Any], gamma: Tensor, rates: Mapping[str, Any]) -> bool:
        """A huge hypergradient can overflow a rate or γ; such a step is skipped (or raises) like a non-finite
        gradient, before anything is written."""
        if all_finite(_rate_tensors(gamma, rates)):
            return True
        return self.skip_nonfinite(group, "learning rate or gamma from the hypergradient (lower hypergrad_lr or "
                                          "gamma_lr)")

    def _compiled_step(self, group: dict[str, Any]) -> bool | None:
        """A step after the first through :mod:`~metaopt.hypergrad.cam_hd_compiled`, reading and writing the group and
        ``self.state`` directly: True, False where it skipped a non-finite step, or None (nothing done) where the group
        does not fit the compiled functions — a parameter without a gradient or without state, mixed dtypes or
        devices, an empty tensor, a momentum buffer not started yet — and steps eagerly."""
        params = list(group["params"])
        grads = [p.grad for p in params]
        if any(g is None or g.is_sparse for g in grads):
            return None
        states = [self.state[p] for p in params]
        dtype, device = params[0].dtype, params[0].device
        if (not all(states) or rate_dtype(dtype) != dtype
                or any(p.dtype != dtype or p.device != device or p.numel() == 0 for p in params)):
            return None
        adam, momentum = self.base == "adam", group.get("momentum", 0.0)
        if momentum and any(s["momentum_buffer"].shape != p.shape for s, p in zip(states, params)):
            return None
        layout, levels, mode = self.layout(group), tuple(group["levels"]), self.compile
        cfg = self._levels_config(group, layout)
        index = layout.indices(device)
        t = group["step"] + 1
        tau_prev, tau = decay_factor(group["decay"], t - 1), decay_factor(group["decay"], t)
        alpha_inf = group["lr"] if group["alpha_inf"] is None else group["alpha_inf"]
        beta1, beta2 = group["betas"] if adam else (0.0, 0.0)
        eps = group["eps"] if adam else 0.0
        # The step's changing scalars as 0-dim tensors (no recompilation): one call for those in the parameters'
        # dtype, one for τ_{t−1} and γ_{t−1} (float64).
        bc1_prev, bc2_prev, bc1, bc2, tau_t, rest = torch.tensor(
            [1 - beta1 ** (t - 1), (1 - beta2 ** (t - 1)) ** 0.5, 1 - beta1**t, (1 - beta2**t) ** 0.5, tau,
             (1 - tau) * alpha_inf], dtype=dtype, device=device).unbind()
        small = torch.tensor([tau_prev, *group["gamma"]], dtype=HYPER_DTYPE, device=device)
        old = {level: None if group[field] is None else torch.tensor(group[field], dtype=HYPER_DTYPE, device=device)
               for level, field in (("unit", "alpha_unit"), ("layer", "alpha_layer"), ("global", "alpha_global"))}
        alphas = [s["alpha_param"] for s in states] if "parameter" in levels else None
        first = [s["exp_avg"] if adam else s["prev_direction"] for s in states]
        second = [s["exp_avg_sq"] for s in states] if adam else None
        unit, layer, global_, gamma_grad, gamma, coarse, gamma_p, coef, checks = compiled_step(levels_step, mode)(
            params, grads, first, second, alphas, old["unit"], old["layer"], old["global"], small[1:], small[0],
            index["unit_index"], index["layer_index"], index["unit_size"], index["layer_size"], group["weight_decay"],
            bc1_prev, bc2_prev, eps, cfg)
        grad_check, rate_check, negative = checks.tolist()
        if not math.isfinite(grad_check) and not self.check_finite(group, grads):
            return False
        if not math.isfinite(rate_check):
            return self.skip_nonfinite(group, "learning rate or gamma from the hypergradient (lower hypergrad_lr or "
                                              "gamma_lr)")
        common = (coef, cfg.clip, gamma_p, tau_t, rest)
        if adam:
            compiled_step(adam_update, mode)(params, grads, first, second, alphas, coarse, group["weight_decay"],
                                             bc1_prev, bc2_prev, bc1, bc2, beta1, beta2, eps, *common)
        else:
            bufs = [s["momentum_buffer"] for s in states] if momentum else first
            compiled_step(sgd_update, mode)(params, grads, first, bufs, alphas, coarse, group["weight_decay"],
                                            momentum, group.get("nesterov", False), *common)
            if momentum and not group["nesterov"]:  # heavy ball: d_{t−1} is the buffer
                for s in states:
                    s["prev_direction"] = s["momentum_buffer"]
        negative_before = group["negative_lr_steps"]
        values = torch.cat([gamma, gamma_grad] + [r.reshape(-1) for r in (unit, layer, global_) if r is not None])
        values, k = values.tolist(), len(levels)
        group["gamma"], group["gamma_grad"], rest_values = values[:k], values[k:2 * k], values[2 * k:]
        for field, rates in (("alpha_unit", unit), ("alpha_layer", layer)):
            if rates is not None:
                group[field], rest_values = rest_values[:rates.numel()], rest_values[rates.numel():]
        if global_ is not None:
            group["alpha_global"] = rest_values[0]
        group["negative_lr_steps"] = negative_before + int(negative)
        group["step"] = t
        warn_negative_rate_once(self, group, negative_before, "clipped to 0" if group["clip_lr_at_zero"]
                                else "kept (clip_lr_at_zero=False)")
        return True

    def _levels_config(self, group: dict[str, Any], layout: ParamLayout) -> LevelsConfig:
        levels = tuple(group["levels"])
        betas = _check_level_betas(group["hypergrad_lr"], levels)
        return LevelsConfig(
            levels, tuple(float(b) for b in betas), group["beta_reduction"], bool(group["clip_lr_at_zero"]),
            float(group["gamma_lr"]), group["gamma_mode"], layout.unit_rows, layout.unit_offset,
            tuple(layout.unit_view_shape(n) for n in layout.names), layout.layer_of, layout.num_units,
            layout.num_layers, layout.numel)

    @staticmethod
    def _apply_in_place(rule: CamHDRule, rates: CamHDRates, params: Params, grads: Params,
                        state: CamHDState) -> CamHDState:
        """Steps 6 and 8 of :meth:`CamHDRule.step` in place: the same kernels on the same operands (Adam's moments
        and update with ``torch._foreach_*`` ops, SGD's update with ``addcmul_``), so the parameters and the state
        equal the rule's bit for bit (tested); returns the new state, whose Adam moments are the updated buffers."""
        t, live, kappa = rates.step, rates.live, rates.kappa
        ps = [params[n] for n in live]
        if rule.base == "adam":
            beta1, beta2, eps = rule.beta1, rule.beta2, rule.eps
            ms, vs = [state.exp_avg[n] for n in live], [state.exp_avg_sq[n] for n in live]
            effective = [rates.effective[n] for n in live]
            torch._foreach_lerp_(ms, effective, 1 - beta1)  # adam_moments
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, effective, effective, value=1 - beta2)
            denom = adam_foreach_denominator(vs, t, beta2, eps)
            rate = kappa[live[0]]
            if not isinstance(rate, Tensor):  # τ_t = 0: Adam at α_∞ (adam_apply)
                torch._foreach_addcdiv_(ps, ms, denom, value=-(rate / (1 - beta1**t)))
            else:  # _adam_apply's tensor-rate arithmetic, per device
                sizes = torch._foreach_neg([kappa[n].to(p.dtype) / p.new_tensor(1 - beta1**t) for n, p in
                                            zip(live, ps)])
                if ps[0].device.type == "cuda":
                    torch._foreach_addcmul_(ps, sizes, torch._foreach_div(ms, denom))
                else:
                    torch._foreach_addcdiv_(ps, torch._foreach_mul(sizes, ms), denom)
            return CamHDAdamState(**rates.state_fields(state), exp_avg=state.exp_avg, exp_avg_sq=state.exp_avg_sq)
        bufs, directions = rule.sgd_directions(rates, grads, state)
        for n, p in zip(live, ps):  # _apply
            rate = kappa[n]
            if isinstance(rate, Tensor):
                p.addcmul_(-rate.to(p.dtype), directions[n])
            else:
                p.add_(directions[n], alpha=-rate)
        return CamHDSGDState(**rates.state_fields(state), momentum_buffer=bufs, prev_direction=directions)

    @torch.no_grad()
    def combined_lr(self, group_index: int = 0) -> dict[str, Tensor]:
        """α* = Σ_k γ_k·α^{(k)} per parameter name of group ``group_index``, from the current state (see
        :meth:`CamHDRule.combined_lr`). Before the first step every entry is α_0."""
        group = self.param_groups[group_index]
        names, params = self.named_params(group)
        param_dict = dict(zip(names, params))
        rule = self.rule(group)
        return rule.combined_lr(param_dict, self.load_rule_state(group, rule, param_dict))


class CamHDSGD(CamHD):
    __doc__ = (r"""CAM-HD over plain SGD (``cam-hd-sgd``): ``d_t = g_t``.

    Defaults: lr 1e-3, hypergrad_lr 1e-3 (the paper's SGD-HD β, also its LeNet-5 SGD-CAM-HD β), gamma_lr 0.01 (its
    SGD runs; ResNet-18 used 1e-3). Memory: α_p and d_{t−1} (+2n).
    """ + "\n" + CamHD.__doc__)
    base = "sgd"

    def __init__(self, params, lr: float = 1e-3, hypergrad_lr: float | Sequence[float] = 1e-3, *,
                 levels: Sequence[str] = DEFAULT_LEVELS, gamma: Sequence[float] | None = None, gamma_lr: float = 0.01,
                 gamma_mode: str = "renorm", decay: float = 0.0, alpha_inf: float | None = None,
                 weight_decay: float = 0.0, beta_reduction: str = "sum", clip_lr_at_zero: bool = False,
                 layer_key: Callable[[str], str] | None = None, nonfinite: str = "skip",
                 fast: bool = True, compile: bool | str = False):
        super().__init__(params, lr, hypergrad_lr, levels=levels, gamma=gamma, gamma_lr=gamma_lr,
                         gamma_mode=gamma_mode, decay=decay, alpha_inf=alpha_inf, weight_decay=weight_decay,
                         beta_reduction=beta_reduction, clip_lr_at_zero=clip_lr_at_zero, layer_key=layer_key,
                         nonfinite=nonfinite, fast=fast, compile=compile)


class CamHDSGDN(CamHD):
    __doc__ = (r"""CAM-HD over SGD with Nesterov momentum (``cam-hd-sgdn``): ``v_t = μ·v + g_t``,
    ``d_t = g_t + μ·v_t`` (torch's buffer, ``v_1 = g_1``); ``nesterov=False`` gives heavy ball, ``d_t = v_t``.

    Defaults: momentum 0.9 (not given by the paper; spec §6(b)), lr 1e-3, hypergrad_lr 1e-3, gamma_lr 0.01.
    Memory: α_p, v and d_{t−1} (+3n).
    """ + "\n" + CamHD.__doc__)
    base = "sgd"

    def __init__(self, params, lr: float = 1e-3, hypergrad_lr: float | Sequence[float] = 1e-3, *,
                 momentum: float = 0.9, nesterov: bool = True, levels: Sequence[str] = DEFAULT_LEVELS,
                 gamma: Sequence[float] | None = None, gamma_lr: float = 0.01, gamma_mode: str = "renorm",
                 decay: float = 0.0, alpha_inf: float | None = None, weight_decay: float = 0.0,
                 beta_reduction: str = "sum", clip_lr_at_zero: bool = False,
                 layer_key: Callable[[str], str] | None = None, nonfinite: str = "skip",
                 fast: bool = True, compile: bool | str = False):
        check_range("momentum value", momentum)
        if nesterov and momentum <= 0:
            raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum > 0")
        super().__init__(params, lr, hypergrad_lr, levels=levels, gamma=gamma, gamma_lr=gamma_lr,
                         gamma_mode=gamma_mode, decay=decay, alpha_inf=alpha_inf, weight_decay=weight_decay,
                         beta_reduction=beta_reduction, clip_lr_at_zero=clip_lr_at_zero, layer_key=layer_key,
                         nonfinite=nonfinite, fast=fast, compile=compile, momentum=momentum, nesterov=nesterov)

    def base_hparams(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(momentum=group["momentum"], nesterov=group["nesterov"])


class CamHDAdam(CamHD):
    __doc__ = (r"""CAM-HD over Adam (``cam-hd-adam``): ``d_t = m̂_t/(√v̂_t + ε)`` in torch's arithmetic (the
    paper's φ/ψ without bias correction and ε are read as standard Adam, A-C5).

    Defaults: the paper's 3-level FFNN setting — lr 1e-3, hypergrad_lr 1e-7, gamma (0.3, 0.3, 0.4), gamma_lr 0.1,
    betas (0.9, 0.999), eps 1e-8 (its ResNet-34 run: β 1e-8, decay 0.002). Memory: α_p, m and v (+3n).
    """ + "\n" + CamHD.__doc__)
    base = "adam"

    def __init__(self, params, lr: float = 1e-3, hypergrad_lr: float | Sequence[float] = 1e-7, *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 levels: Sequence[str] = DEFAULT_LEVELS, gamma: Sequence[float] | None = None, gamma_lr: float = 0.1,
                 gamma_mode: str = "renorm", decay: float = 0.0, alpha_inf: float | None = None,
                 weight_decay: float = 0.0, beta_reduction: str = "sum", clip_lr_at_zero: bool = False,
                 layer_key: Callable[[str], str] | None = None, nonfinite: str = "skip",
                 fast: bool = True, compile: bool | str = False):
        check_range("epsilon value", eps)
        check_betas(betas)
        super().__init__(params, lr, hypergrad_lr, levels=levels, gamma=gamma, gamma_lr=gamma_lr,
                         gamma_mode=gamma_mode, decay=decay, alpha_inf=alpha_inf, weight_decay=weight_decay,
                         beta_reduction=beta_reduction, clip_lr_at_zero=clip_lr_at_zero, layer_key=layer_key,
                         nonfinite=nonfinite, fast=fast, compile=compile, betas=tuple(betas), eps=eps)

    def base_hparams(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(betas=tuple(group["betas"]), eps=group["eps"])


# The registrations' records (metaopt.registry): test_hparams for the contract tests' least-squares problem,
# memory models at the registered defaults.
register_optimizer("cam-hd-sgd", kind="hypergradient", test_hparams=dict(lr=0.05),
                   memory=MemoryModel(2, 2, "per-parameter rate, previous direction; reads g, d_prev for the level "
                                            "hypergradients"))(CamHDSGD)
register_optimizer("cam-hd-sgdn", kind="hypergradient", test_hparams=dict(lr=0.05),
                   memory=MemoryModel(3, 2, "per-parameter rate, momentum buffer, previous direction; reads g, d_prev")
                   )(CamHDSGDN)
register_optimizer("cam-hd-adam", kind="hypergradient", test_hparams=dict(lr=0.05, hypergrad_lr=1e-4),
                   memory=MemoryModel(3, 3, "per-parameter rate, m, v; reads g, m, v for the level hypergradients")
                   )(CamHDAdam)

__all__ = ["BETA_REDUCTIONS", "DEFAULT_GAMMA", "DEFAULT_LEVELS", "GAMMA_MODES", "LEVELS", "CamHD", "CamHDAdam",
           "CamHDAdamState", "CamHDHypergradients", "CamHDRule", "CamHDSGD", "CamHDSGDN", "CamHDSGDState",
           "ParamLayout", "combine_levels", "decay_factor", "default_gamma", "level_hypergradients", "level_rates",
           "module_prefix", "parse_levels", "update_gamma"]
