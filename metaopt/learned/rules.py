r"""Learned rules inside hand-designed hypergradient optimizers: a learned CAM-HD γ and a learned MARTHE μ.

Both keep the hand-designed algorithm and replace one of its heuristics with a small network over scale-free
statistics, initialized so that the optimizer *is* the hand-designed one at θ init:

* :class:`LearnedGammaCAMHD` (``cam-hd-learned-gamma``): CAM-HD (``papers/cam-hd-long.txt``, Alg. 1; spec §6) whose
  level weights γ_t come from a network instead of the δ rule (spec §6(b) step 5). At init γ_t ≡ γ₀, the paper's
  fixed weights, so it equals ``cam-hd-*`` with ``gamma_lr=0`` (the paper's fixed-γ sweep) step for step.
* :class:`LearnedMuMARTHE` (``marthe-learned-mu``): MARTHE (``papers/marthe.txt``; spec §5) whose damping μ_{t+1} is
  h_μ (App. B) plus a learned correction, zero at init — App. B's "future work": "meta-learning these update rules".

Neither copies the maths: the updates are :class:`~metaopt.hypergrad.cam_hd.CamHDRule` (its ``gamma=`` hook) and
:class:`~metaopt.hypergrad.marthe.MartheRule` (its ``mu=`` hook). This module owns the networks, their features, the
state layout that lets the rules be meta-trained, and the frozen faces.

**Exact-at-init networks.** Each network is a :class:`MirroredMLP`: two identical one-hidden-layer MLPs whose outputs
are subtracted, so its output is exactly 0 for every input at init while every weight still receives a meta-gradient
(with a zero last layer, as in a plain residual init, the hidden layer would get no meta-gradient until the last layer
has moved). γ = softmax(log γ₀ + z) = γ₀ at z = 0, μ = clip(h_μ + z, 0, 1) = h_μ at z = 0.

**State layout.** A learned optimizer's state is a NamedTuple of dicts keyed by parameter name. The unroll and the
truncation boundary take any pytree, but the meta-trainer's training-state file stores it as ``{field: dict(value)}``
and restores it with ``type(state)(**fields)`` (``MetaTrainer.state_dict`` / ``load_state``), so this layout is that
file's format: the rules cannot carry CamHDRule's / MartheRule's own states (Python ints, ``None`` for unused levels,
bare tensors) as they are, and translate at each call (``_to_rule_state`` / ``_from_rule_state``). The rules'
group-level quantities (γ, the unit / layer / global rates, η, β, μ, c, the step count) are therefore *replicated*
under every name (the same tensor object), listed in ``group_fields``; the frozen CAM-HD face stores them once per
param group (:class:`FrozenGroupStateOptimizer`). Learning rates are stored as their change since the initial rate
(``α_t − α_0``, ``η_t − η_0``), so the ``lr`` passed to :meth:`update` (the checkpoint's by default, the face's ``lr``)
is the initial rate whatever state exists. For float64 rates the round trip ``α_0 + (α_t − α_0)`` gives back α_t
exactly while α_t stays within a factor 2 of α_0 (the subtraction is then exact, Sterbenz's lemma); beyond, it may
round in the last bit, which is why "equal to the hand-designed rule at θ init" holds bit for bit only that far (and
to rounding after).

**Unroll protocol** (read by :func:`metaopt.meta.unroll.unroll`; see its module docstring):

* ``static_step(state) -> int | None``: the Adam bases' bias corrections need the step count as a Python int, which a
  vmapped call cannot read from a per-instance tensor; the unroll groups instances by it and passes ``step=`` to
  :meth:`update`. SGD-type bases return ``None`` (their arithmetic does not depend on it, see ``_RULE_STEP``).
* ``needs_oracles`` and ``hvp_vectors(state)`` (MARTHE only): the unroll also passes ``hvp=`` (H_t·Z_t of the
  training loss at w_t) and ``val_grads=`` (∇E(w_t) on a validation batch), computed outside vmap.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from metaopt.baselines import with_weight_decay
from metaopt.core import FunctionalOptimizer, check_betas, check_range
from metaopt.hypergrad.cam_hd import (DEFAULT_LEVELS, CamHDAdamState, CamHDHypergradients, CamHDRule, CamHDSGDState,
                                      ParamLayout, check_gamma, default_gamma, level_rates, parse_levels)
from metaopt.hypergrad.marthe import (DEFAULT_LR, DEFAULT_MOMENTUM, Marthe, MartheAdamState, MartheDiagnostics,
                                      MartheMomentumState, MartheRule, MartheSGDState)
from metaopt.learned.base import FrozenLearnedOptimizer, LearnedOptimizer, Params, register_learned
from metaopt.numerics import TINY

F64 = torch.float64

# SGD-type bases hand the rules a fixed Python step count ≥ 1. Their only step-dependent branches are first-step
# shortcuts (d_0 = 0 ⇒ h_1 = 0; torch's momentum buffer starts at g_1; Z_0 = 0 ⇒ no H·Z), and from the zero-filled
# state that init() builds the non-first branch computes the same values (0·μ + g = g, ⟨g, 0⟩ = 0, μ·0 − d = −d), so
# one vmapped call serves instances at different steps. Adam's bias corrections need the true count (static_step).
_RULE_STEP = 1


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den = 0, with a finite derivative everywhere (no 0/0 in the graph)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def _safe_sqrt(x: Tensor) -> Tensor:
    """√x for x ≥ 0 with derivative 0 (not ∞) at 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _replicate(value: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    return {n: value for n in names}


def _first(field: dict[str, Tensor]) -> Tensor:
    return next(iter(field.values()))


def _group_value(value: Tensor) -> Any:
    """A group-level tensor as a Python number or (nested) list: exact for float64 and int64."""
    value = value.detach()
    return value.item() if value.dim() == 0 else value.cpu().tolist()


class MirroredMLP(nn.Module):
    """``z(x) = f_a(x) − f_b(x)`` with f_a, f_b one-hidden-layer tanh MLPs that start as exact copies.

    The output is exactly 0 for every input at init (the two branches run identical arithmetic), yet every weight has
    a nonzero derivative (∂z/∂f_a = 1, ∂z/∂f_b = −1), so meta-training moves all of θ from the first step. Shapes:
    (..., in_features) → (..., out_features). Memory: 2·(in·hidden + hidden + hidden·out + out) parameters.
    """

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"Invalid hidden: {hidden} (expected >= 1)")
        self.branch_a = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features))
        self.branch_b = copy.deepcopy(self.branch_a)

    def forward(self, x: Tensor) -> Tensor:
        return self.branch_a(x) - self.branch_b(x)


# ----------------------------------------------------------------------------------------------------------------------
# The frozen face for states with replicated group-level fields


class FrozenGroupStateOptimizer(FrozenLearnedOptimizer):
    """:class:`~metaopt.learned.base.FrozenLearnedOptimizer` for a learned optimizer whose state replicates
    group-level quantities under every parameter name (``lopt.group_fields``).

    Those fields are stored once, in ``param_groups[i][field]`` as Python numbers / lists (visible to users, exact
    through ``state_dict()``); the per-parameter fields live in ``optimizer.state[p]`` as usual. Keeping the float64
    γ and rates out of ``optimizer.state`` matters: ``torch.optim.Optimizer.load_state_dict`` casts floating-point
    per-parameter state to the parameter's dtype, which would round them to float32 on a float32 model and break exact
    resume. All parameters of a group are expected to receive gradients together (as every metaopt face assumes).
    """

    def load_rule_state(self, group: dict[str, Any], rule: FunctionalOptimizer, params: Params) -> NamedTuple:
        missing = {n: p for n, p in params.items() if not self.state[p]}
        fresh = rule.init(missing if missing else params)
        names, group_fields = list(params), self.lopt.group_fields
        values = {}
        for field, init_value in zip(fresh._fields, fresh):
            if field in group_fields:
                like = _first(init_value)
                value = (torch.as_tensor(group[field], dtype=like.dtype, device=like.device) if field in group
                         else like)
                values[field] = _replicate(value, names)
            else:
                values[field] = {n: (init_value[n] if n in missing else self.state[p][field])
                                 for n, p in params.items()}
        return type(fresh)(**values)

    def store_rule_state(self, group: dict[str, Any], params: Params, state: NamedTuple) -> None:
        for field, value in zip(state._fields, state):
            if field in self.lopt.group_fields:
                group[field] = _group_value(_first(value))
            else:
                for n, p in params.items():
                    self.state[p][field] = value[n]


# ----------------------------------------------------------------------------------------------------------------------
# CAM-HD with a learned γ


class LearnedGammaSGDState(NamedTuple):
    """State over an SGD / SGDN base. Group-level fields hold the same tensor under every name."""
    step: dict[str, Tensor]                 # t, int64 0-d (group)
    gamma: dict[str, Tensor]                # γ_t (the weights the last step used), (K,) float64 (group)
    gamma_grad: dict[str, Tensor]           # ∂L/∂γ of the last step, (K,) float64 (group)
    alpha_param_change: dict[str, Tensor]   # α^{(p)}_t − α_0, shaped like the parameter (or (0,) if unused)
    alpha_unit_change: dict[str, Tensor]    # α^{(u)}_t − α_0, (num_units,) float64 or (0,) (group)
    alpha_layer_change: dict[str, Tensor]   # α^{(l)}_t − α_0, (num_layers,) float64 or (0,) (group)
    alpha_global_change: dict[str, Tensor]  # α^{(g)}_t − α_0, 0-d float64 or (0,) (group)
    negative_lr_steps: dict[str, Tensor]    # int64 0-d (group), as CamHDRule counts them
    momentum_buffer: dict[str, Tensor]      # v_t (zeros at init; (0,) for plain SGD)
    prev_direction: dict[str, Tensor]       # d_{t−1}


class LearnedGammaAdamState(NamedTuple):
    """State over an Adam base; d_{t−1} is recomputed from (m, v) by CamHDRule."""
    step: dict[str, Tensor]
    gamma: dict[str, Tensor]
    gamma_grad: dict[str, Tensor]
    alpha_param_change: dict[str, Tensor]
    alpha_unit_change: dict[str, Tensor]
    alpha_layer_change: dict[str, Tensor]
    alpha_global_change: dict[str, Tensor]
    negative_lr_steps: dict[str, Tensor]
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]


_CHANGE_FIELDS = {"parameter": "alpha_param_change", "unit": "alpha_unit_change", "layer": "alpha_layer_change",
                  "global": "alpha_global_change"}

GAMMA_BASES = ("sgd", "sgdn", "adam")
# Paper values, as the hand-designed faces (cam-hd-sgd / cam-hd-sgdn / cam-hd-adam): β per base
DEFAULT_HYPERGRAD_LR = {"sgd": 1e-3, "sgdn": 1e-3, "adam": 1e-7}
GAMMA_TIME_SCALES = (10.0, 100.0, 1000.0)  # progress features tanh(t/τ): the horizon is unknown to an optimizer


@register_learned("cam-hd-learned-gamma")
class LearnedGammaCAMHD(LearnedOptimizer):
    r"""CAM-HD whose combination weights γ_t come from a small network (``cam-hd-learned-gamma``).

    Per step t (CamHDRule, spec §6(b), with the γ hook)::

        h^{(k)}[G] = −Σ_{p∈G} g_t[p]·d_{t−1}[p]                      (eq. 34, true sign)
        γ_t        = softmax(log γ₀ + z_t),  z_t = MirroredMLP(x_t)     (replaces Alg. 1's δ rule; z ≡ 0 at init)
        α^{(k)}_t  = α^{(k)}_{t−1} − β·γ_{k,t}·h^{(k)}                   (Alg. 1)
        θ_t        = θ_{t−1} − (Σ_k γ_{k,t}·α^{(k)}_t[π_k]) ⊙ d_t         (eq. 32; d_t the SGD / SGDN / Adam direction)

    Features x_t (4K + 5 of them for K levels, all scale-free: invariant to rescaling the loss and, but for the
    drift, to rescaling every rate):

    * per level, the coherence Σ_G |h^{(k)}[G]| / Σ_p |g_t[p]·d_{t−1}[p]| ∈ [0, 1] (how much the finer hypergradients
      cancel inside the level's groups; 1 at the parameter level, 0 on the first step);
    * cos(g_t, d_{t−1});
    * the last step's ∂L/∂γ (what Alg. 1's δ rule descends), normalized by its ℓ1 norm;
    * the centred logs of the levels' mean rates |ᾱ^{(k)}| (log ratios of the levels' α), and the drift
      log(|Σ_k γ_k ᾱ^{(k)}| / α_0);
    * log γ_{t−1} − log γ₀ (a recurrence: the network can keep γ where it moved it);
    * progress tanh(t/τ) for τ ∈ (10, 100, 1000).

    Logs are clamped to [−10, 10]. At θ init γ_t = γ₀ exactly, so the optimizer equals ``cam-hd-<base>`` with
    ``gamma_lr=0`` (the paper's fixed-γ runs; δ = 0) step for step.

    Args:
        base: ``"adam"`` (default), ``"sgd"`` or ``"sgdn"`` (Nesterov momentum; ``nesterov=False``: heavy ball).
        lr: α_0, the initial rate of every level (paper 1e-3). The state holds α_t − α_0, so the ``lr`` given to
            :meth:`update` or to the frozen face sets the starting rate; changing it shifts every level's rate.
        hypergrad_lr: β (default: the paper's, 1e-7 for Adam, 1e-3 for SGD / SGDN), one or one per level.
        levels, gamma: the levels (default the paper's 3-level ``("parameter", "layer", "global")``) and γ₀
            (default (0.3, 0.3, 0.4), the paper's FFNN setting; (0.2, 0.8) for 2 levels ending in global). γ₀ > 0:
            a zero weight would be a −∞ logit the network could never move.
        momentum, nesterov: SGDN's (default 0.9, Nesterov).
        betas, eps: Adam's (paper: standard values).
        weight_decay: coupled L2 (part of g and of every h).
        beta_reduction, clip_lr_at_zero: as the hand-designed faces (A-C4, A-HD3).
        hidden: width of the network's hidden layer (each of its two branches).

    The decay schedule τ(t) of the hand-designed faces is not offered: the network sees the step count and can learn a
    schedule over γ; the rates themselves follow Alg. 1.

    Memory per parameter element: the parameter-level change α_p − α_0 (+n when that level is used), plus d_{t−1}
    (+n) for SGD, v and d_{t−1} (+2n) for SGDN, m and v (+2n) for Adam; the unit / layer / global changes, γ and ∂L/∂γ
    are O(units + layers + K) per group. θ: 2·((4K + 5)·hidden + hidden + hidden·K + K) floats (1,350 at K = 3,
    hidden = 32). Work: CamHDRule's step plus one more O(n) pass for the features (the level hypergradients are the
    step's own, from :meth:`CamHDRule.hypergradients`); no extra forward / backward pass.
    """

    group_fields: ClassVar[tuple[str, ...]] = ("step", "gamma", "gamma_grad", "alpha_unit_change",
                                               "alpha_layer_change", "alpha_global_change", "negative_lr_steps")

    def __init__(self, base: str = "adam", lr: float = 1e-3, hypergrad_lr: float | Sequence[float] | None = None, *,
                 levels: Sequence[str] = DEFAULT_LEVELS, gamma: Sequence[float] | None = None,
                 momentum: float | None = None, nesterov: bool = True, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, beta_reduction: str = "sum",
                 clip_lr_at_zero: bool = False, hidden: int = 32):
        super().__init__()
        if base not in GAMMA_BASES:
            raise ValueError(f"Invalid base: {base!r} (expected one of {GAMMA_BASES})")
        check_range("learning rate", lr)
        self.levels = parse_levels(levels)
        gamma0 = default_gamma(self.levels) if gamma is None else tuple(float(x) for x in gamma)
        check_gamma(gamma0, self.levels)
        if min(gamma0) <= 0:
            raise ValueError(f"Invalid gamma: {gamma0!r} (the learned rule needs every initial weight > 0)")
        if hypergrad_lr is None:
            hypergrad_lr = DEFAULT_HYPERGRAD_LR[base]
        if base == "sgdn":
            momentum = 0.9 if momentum is None else momentum
            check_range("momentum value", momentum)
            if nesterov and momentum <= 0:
                raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum > 0")
        elif momentum not in (None, 0, 0.0):
            raise ValueError(f"Invalid momentum: {momentum!r} (base {base!r} has no momentum; use base='sgdn')")
        else:
            momentum = 0.0
        check_betas(tuple(betas))
        check_range("epsilon value", eps)
        check_range("weight_decay value", weight_decay)
        self.base, self.lr, self.gamma0 = base, float(lr), gamma0
        self.hypergrad_lr = float(hypergrad_lr) if isinstance(hypergrad_lr, (int, float)) else \
            tuple(float(b) for b in hypergrad_lr)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        self.beta_reduction, self.clip_lr_at_zero = beta_reduction, bool(clip_lr_at_zero)
        betas_config = self.hypergrad_lr if isinstance(self.hypergrad_lr, float) else list(self.hypergrad_lr)
        self._store_config(base=base, lr=self.lr, hypergrad_lr=betas_config,
                           levels=list(self.levels), gamma=list(gamma0), momentum=self.momentum,
                           nesterov=self.nesterov, betas=list(self.betas), eps=self.eps,
                           weight_decay=self.weight_decay, beta_reduction=beta_reduction,
                           clip_lr_at_zero=self.clip_lr_at_zero, hidden=hidden)
        k = len(self.levels)
        self.num_features = 4 * k + 2 + len(GAMMA_TIME_SCALES)
        self.net = MirroredMLP(self.num_features, hidden, k)
        self.rule(0.0)  # validates the remaining CamHDRule arguments (beta_reduction, per-level β) now
        self._layouts: dict[tuple, ParamLayout] = {}

    # -- the rule and its layout ------------------------------------------------------------------------------------

    def rule(self, lr: float | Tensor, layout: ParamLayout | None = None) -> CamHDRule:
        """The hand-designed rule this optimizer wraps (γ fixed at γ₀, δ = 0: the learned γ comes in per step)."""
        return CamHDRule("adam" if self.base == "adam" else "sgd", lr=lr, hypergrad_lr=self.hypergrad_lr,
                         levels=self.levels, gamma=self.gamma0, gamma_lr=0.0, beta_reduction=self.beta_reduction,
                         clip_lr_at_zero=self.clip_lr_at_zero, momentum=self.momentum, nesterov=self.nesterov,
                         betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, layout=layout)

    def layout(self, params: Params) -> ParamLayout:
        """The level groupings of ``params`` (cached per names and shapes). Names from ``named_parameters()`` group
        layers by module, as the hand-designed faces; the frozen face's names for plain ``parameters()`` are indices
        ("0", "1", …), and then each tensor is a layer, again as the hand-designed faces."""
        names = tuple(params)
        shapes = tuple(tuple(p.shape) for p in params.values())
        key = (names, shapes)
        layout = self._layouts.get(key)
        if layout is None:
            named = not all(n.isdigit() for n in names)
            layout = ParamLayout(names, shapes, named=named)
            self._layouts[key] = layout
        return layout

    # -- state ------------------------------------------------------------------------------------------------------

    def init(self, params: Params) -> LearnedGammaSGDState | LearnedGammaAdamState:
        layout = self.layout(params)
        state = self.rule(self.lr, layout).init(params)
        if self.momentum > 0:  # a zero buffer instead of torch's "None" placeholder: see _RULE_STEP
            state = state._replace(momentum_buffer={n: torch.zeros_like(p) for n, p in params.items()})
        like = next(iter(params.values()))
        return self._from_rule_state(state, self.lr, torch.zeros((), dtype=torch.int64, device=like.device),
                                     list(params), like.device)

    def _from_rule_state(self, state: Any, lr: float | Tensor, step: Tensor, names: list[str],
                         device: torch.device) -> LearnedGammaSGDState | LearnedGammaAdamState:
        unused = torch.zeros(0, dtype=F64, device=device)
        rates = level_rates(state, self.levels)
        changes = {}
        for level, field in _CHANGE_FIELDS.items():
            if level not in rates:
                changes[field] = _replicate(unused, names)
            elif level == "parameter":
                changes[field] = {n: rates[level][n] - lr for n in names}
            else:
                changes[field] = _replicate(rates[level] - lr, names)
        negative = torch.as_tensor(state.negative_lr_steps, dtype=torch.int64, device=device)
        common = dict(step=_replicate(step, names), gamma=_replicate(state.gamma, names),
                      gamma_grad=_replicate(state.gamma_grad, names), negative_lr_steps=_replicate(negative, names),
                      **changes)
        if self.base == "adam":
            return LearnedGammaAdamState(**common, exp_avg=dict(state.exp_avg), exp_avg_sq=dict(state.exp_avg_sq))
        return LearnedGammaSGDState(**common, momentum_buffer=dict(state.momentum_buffer),
                                    prev_direction=dict(state.prev_direction))

    def _to_rule_state(self, state: Any, lr: float | Tensor, step: int, names: list[str]) -> Any:
        rates = {}
        for level in self.levels:
            change = getattr(state, _CHANGE_FIELDS[level])
            rates[level] = {n: lr + change[n] for n in names} if level == "parameter" else lr + _first(change)
        common = dict(step=step, gamma=_first(state.gamma), gamma_grad=_first(state.gamma_grad),
                      alpha_param=rates.get("parameter"), alpha_unit=rates.get("unit"),
                      alpha_layer=rates.get("layer"), alpha_global=rates.get("global"),
                      negative_lr_steps=_first(state.negative_lr_steps))
        if self.base == "adam":
            return CamHDAdamState(**common, exp_avg=state.exp_avg, exp_avg_sq=state.exp_avg_sq)
        return CamHDSGDState(**common, momentum_buffer=state.momentum_buffer, prev_direction=state.prev_direction)

    def static_step(self, state: Any) -> int | None:
        """The step count as a Python int where the arithmetic needs it (Adam's bias corrections), else None. Reads
        one instance's state (a stacked one gives instance 0's count). Unroll protocol, see the module docstring."""
        if self.base != "adam":
            return None
        return int(_first(state.step).reshape(-1)[0])

    def _rule_step(self, state: Any, step: int | None) -> int:
        if self.base != "adam":
            return _RULE_STEP
        if step is not None:
            return int(step)
        try:
            return int(_first(state.step))
        except RuntimeError as err:  # a per-instance tensor under vmap has no Python value
            raise RuntimeError(f"{type(self).__name__} over Adam needs the step count as a Python int under "
                               "torch.func.vmap: pass update(..., step=lopt.static_step(state)) (metaopt.meta.unroll "
                               "does, grouping instances by it)") from err

    # -- the γ network ------------------------------------------------------------------------------------------------

    def features(self, hypergradients: CamHDHypergradients, state: Any, layout: ParamLayout,
                 lr: float | Tensor) -> Tensor:
        """The (4K + 5,) float64 feature vector x_t (class docstring) from steps 1–2 of the step
        (:meth:`CamHDRule.hypergradients`, which the step then reuses); differentiable, vmap-friendly."""
        names = layout.names  # every parameter has a gradient (update checks), so live == names
        effective, prev, h = hypergradients.effective, hypergradients.prev_directions, hypergradients.h
        like = _first(state.gamma)
        zero = torch.zeros((), dtype=F64, device=like.device)
        l1 = dot = g2 = d2 = zero
        for n in names:
            g = effective[n]
            g2 = g2 + (g * g).sum(dtype=F64)
            d = prev.get(n)
            if d is not None:
                e = g * d
                l1 = l1 + e.abs().sum(dtype=F64)
                dot = dot + e.sum(dtype=F64)
                d2 = d2 + (d * d).sum(dtype=F64)

        coherence, mean_rates = [], []
        for level in self.levels:
            change = getattr(state, _CHANGE_FIELDS[level])
            if level == "parameter":
                total = zero
                for t in h[level].values():
                    total = total + t.abs().sum(dtype=F64)
                mean_change = zero
                for n in names:
                    mean_change = mean_change + change[n].sum(dtype=F64)
                mean_change = mean_change / layout.numel
            else:
                total = h[level].abs().sum()
                mean_change = _first(change).mean()
            coherence.append(_safe_div(total, l1))
            mean_rates.append(lr + mean_change)
        cosine = _safe_div(dot, _safe_sqrt(g2 * d2))

        gamma_grad = _first(state.gamma_grad)
        gamma_grad = _safe_div(gamma_grad, gamma_grad.abs().sum().expand_as(gamma_grad))
        rates = torch.stack(mean_rates)
        log_rates = torch.log(rates.abs() + TINY)
        rate_logs = (log_rates - log_rates.mean()).clamp(-10.0, 10.0)
        gamma_prev = _first(state.gamma)
        alpha0 = torch.as_tensor(lr, dtype=F64, device=like.device).abs()
        drift = (torch.log((gamma_prev * rates).sum().abs() + TINY) - torch.log(alpha0 + TINY)).clamp(-10.0, 10.0)
        gamma0 = torch.tensor(self.gamma0, dtype=F64, device=like.device)
        gamma_rel = (torch.log(gamma_prev + TINY) - torch.log(gamma0)).clamp(-10.0, 10.0)
        t = _first(state.step).to(F64)
        progress = torch.stack([torch.tanh(t / tau) for tau in GAMMA_TIME_SCALES])
        return torch.cat([torch.stack(coherence), cosine.reshape(1), gamma_grad, rate_logs, drift.reshape(1),
                          gamma_rel, progress])

    def gamma_weights(self, features: Tensor) -> Tensor:
        """γ = softmax(log γ₀ + z(x)) as γ₀·e^{z − max z} / Σ γ₀·e^{z − max z}: exactly γ₀ where z = 0 (θ init)."""
        z = self.net(features.to(next(self.net.parameters()))).to(F64)
        weights = torch.tensor(self.gamma0, dtype=F64, device=z.device) * torch.exp(z - z.max())
        return weights / weights.sum()

    # -- the update ---------------------------------------------------------------------------------------------------

    def update(self, grads: Params, state: Any, params: Params, lr: float | Tensor | None = None, *,
               step: int | None = None) -> tuple[Params, Any]:
        """One CAM-HD step with the network's γ_t. Returns additive updates (new − old parameters) and the new state.

        ``lr``: α_0 (default ``self.lr``). ``step``: the step count as a Python int (Adam base under vmap; see
        :meth:`static_step`). Every parameter needs a gradient (the level groupings are over the parameter set).
        """
        if set(grads) != set(params):
            raise ValueError(f"{type(self).__name__}.update needs a gradient for every parameter (the level "
                             f"groupings are over the whole set); missing: {sorted(set(params) - set(grads))}")
        names = list(params)
        lr = self.lr if lr is None else lr
        layout = self.layout(params)
        for level in set(self.levels) & {"unit", "layer"}:
            stored = _first(getattr(state, _CHANGE_FIELDS[level])).shape[-1]
            if stored != layout.num_groups(level):
                raise ValueError(f"{type(self).__name__}: the state has {stored} {level} rates but these parameters "
                                 f"form {layout.num_groups(level)} {level}s; the parameter set changed since init "
                                 "(on the frozen face: every parameter of a group needs a gradient at every step)")
        rule = self.rule(lr, layout)
        rule_state = self._to_rule_state(state, lr, self._rule_step(state, step), names)
        hypergradients = rule.hypergradients(params, grads, rule_state)  # once: the features and the step share them
        gamma = self.gamma_weights(self.features(hypergradients, state, layout, lr))
        new_params, new_state = rule.step(params, grads, rule_state, gamma=gamma, hypergradients=hypergradients)
        t = _first(state.step)
        out = self._from_rule_state(new_state, lr, t + 1, names, t.device)
        return {n: new_params[n] - params[n] for n in names}, out

    def frozen(self, params, lr: float | None = None, *, nonfinite: str = "skip") -> torch.optim.Optimizer:
        """This optimizer with θ frozen, as a ``torch.optim.Optimizer`` (the generic learned face; γ, the group-level
        rates and the step count are kept in ``param_groups[i]``, see :class:`FrozenGroupStateOptimizer`). Pass
        ``model.named_parameters()`` so that layers follow the modules."""
        return FrozenGroupStateOptimizer(params, self, lr=lr, nonfinite=nonfinite)


# ----------------------------------------------------------------------------------------------------------------------
# MARTHE with a learned damping μ


class LearnedMuSGDState(NamedTuple):
    """State over an SGD base; the scalars are group-level (the same 0-d tensor under every name)."""
    step: dict[str, Tensor]          # t, int64
    lr_change: dict[str, Tensor]     # η_t − η_0, float64
    hypergrad_lr: dict[str, Tensor]  # β_t
    damping: dict[str, Tensor]       # μ_t
    horizon: dict[str, Tensor]       # c_t
    delta_lr: dict[str, Tensor]      # Δη_t
    tangent: dict[str, Tensor]       # Z^w_t
    direction: dict[str, Tensor]     # d_{t−1}


class LearnedMuMomentumState(NamedTuple):
    """State over heavy-ball SGD with momentum."""
    step: dict[str, Tensor]
    lr_change: dict[str, Tensor]
    hypergrad_lr: dict[str, Tensor]
    damping: dict[str, Tensor]
    horizon: dict[str, Tensor]
    delta_lr: dict[str, Tensor]
    tangent: dict[str, Tensor]
    direction: dict[str, Tensor]
    momentum_buffer: dict[str, Tensor]
    tangent_momentum_buffer: dict[str, Tensor]


class LearnedMuAdamState(NamedTuple):
    """State over Adam."""
    step: dict[str, Tensor]
    lr_change: dict[str, Tensor]
    hypergrad_lr: dict[str, Tensor]
    damping: dict[str, Tensor]
    horizon: dict[str, Tensor]
    delta_lr: dict[str, Tensor]
    tangent: dict[str, Tensor]
    direction: dict[str, Tensor]
    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    tangent_exp_avg: dict[str, Tensor]
    tangent_exp_avg_sq: dict[str, Tensor]


_MU_STATES = {"sgd": (LearnedMuSGDState, MartheSGDState), "momentum": (LearnedMuMomentumState, MartheMomentumState),
              "adam": (LearnedMuAdamState, MartheAdamState)}
_HYPER_FIELDS = ("lr", "hypergrad_lr", "damping", "horizon", "delta_lr")  # what MartheRule.hyper_step changes


def h_mu(q_tilde: float | Tensor, horizon: float | Tensor) -> float | Tensor:
    """MARTHE's damping heuristic μ_{t+1} = q̃^{1/(c_t + 1)} (App. B). Python floats use the expression the ``marthe``
    face evaluates (so the frozen face equals it bit for bit); tensors get a derivative that is finite at q̃ = 0."""
    if not isinstance(q_tilde, Tensor) and not isinstance(horizon, Tensor):
        return q_tilde ** (1.0 / (horizon + 1.0))
    q_tilde, horizon = torch.as_tensor(q_tilde, dtype=F64), torch.as_tensor(horizon, dtype=F64)
    positive = q_tilde > 0
    base = torch.where(positive, q_tilde, torch.ones_like(q_tilde))
    return torch.where(positive, base ** (1.0 / (horizon + 1.0)), torch.zeros_like(q_tilde))


def mu_features(diag: MartheDiagnostics) -> Tensor:
    """The (8,) float64 features of the damping network, from what h_μ looks at (App. B), all scale-free:

    q̃; tanh(r) with r = Δη_{t+1}/g'_1; log(1 + c_t); μ_t; h_μ; the agreement 2ab/(a² + b²) ∈ [−1, 1] and the magnitude
    contrast (|a| − |b|)/(|a| + |b|) of a = Δη_{t+1}, b = Δη_t; tanh of the relative learning-rate step
    −β_{t+1}Δη_{t+1}/η_t (η_t = η_{t+1}^{unclipped} + β_{t+1}Δη_{t+1}). Ratios with a zero denominator are 0.
    """
    as64 = lambda x: torch.as_tensor(x, dtype=F64)  # noqa: E731  (diagnostics are floats on the face)
    delta, delta_prev, ratio = as64(diag.delta_lr), as64(diag.delta_lr_prev), as64(diag.ratio)
    q_tilde, horizon, damping = as64(diag.q_tilde), as64(diag.horizon), as64(diag.damping)
    step_size = as64(diag.hypergrad_lr) * delta
    lr_now = as64(diag.lr_unclipped) + step_size
    scale = torch.maximum(delta.abs(), delta_prev.abs())
    a, b = _safe_div(delta, scale), _safe_div(delta_prev, scale)
    agreement = _safe_div(2 * a * b, a * a + b * b)
    contrast = _safe_div(a.abs() - b.abs(), a.abs() + b.abs())
    return torch.stack([q_tilde, torch.tanh(ratio), torch.log1p(horizon), damping, h_mu(q_tilde, horizon),
                        agreement, contrast, torch.tanh(_safe_div(-step_size, lr_now))])


MU_FEATURES = 8


@register_learned("marthe-learned-mu")
class LearnedMuMARTHE(LearnedOptimizer):
    r"""MARTHE whose damping μ_{t+1} = clip(h_μ + z, 0, 1) has a learned correction z (``marthe-learned-mu``).

    MartheRule per step t (spec §5(b); paper eqs. 5, 9–11, Alg. 1 with the β sign corrected, A-M1)::

        Z_{t+1}   = μ_t·A_t·Z_t + B_t            (tangent; SGD: μ_t(Z_t − η_t H_t Z_t) − ∇L_t)
        w_{t+1}   = w_t − η_t·d_t
        Δη_{t+1}  = ⟨∇E(w_{t+1}), Z_{t+1}⟩,  g'_1 = −⟨d_t, ∇E(w_{t+1})⟩,  q̃ = clip(Δη_{t+1}/g'_1, 0, 1)
        μ_{t+1}   = clip(q̃^{1/(c_t+1)} + z(x_t), 0, 1),  c_{t+1} = μ_t(1 + c_t)     (App. B h_μ + the network)
        β_{t+1}   = max(β_t + β_hyper·Δη_{t+1}·Δη_t, 0),  η_{t+1} = max(η_t − β_{t+1}·Δη_{t+1}, 0)

    z = MirroredMLP(x_t) over :func:`mu_features` is exactly 0 at θ init, so the optimizer is ``marthe`` step for
    step. The clip passes the derivative at its edges (h_μ is often exactly 1, on convex problems always, M-4): a
    ``torch.clamp`` there would give the network no meta-gradient.

    Args (defaults: the ``marthe`` face's, i.e. the paper's §6 setting):
        base: ``"momentum"`` (heavy ball, 0.9), ``"sgd"`` or ``"adam"``.
        lr: η_0 (default 0.1 for momentum, 0.01 for SGD, 3e-4 for Adam). The state holds η_t − η_0.
        hypergrad_lr: β_0 (0: Alg. 1 "requires β_0 = 0").
        adapt_hypergrad_lr: β_hyper (1e-6, the authors' code), or None for a fixed β.
        momentum, betas, eps, weight_decay: the base's (weight decay is in L and H, not in E, A-M6).
        hidden: width of the network's hidden layer (each branch).

    The hyper-learning-rate update stays the paper's; only μ is learned.

    Functional use, one call per step (:meth:`update`): the call for step t first finishes step t−1 — its hyper-step
    needs ∇E(w_t), the validation gradient at the parameters this call receives — then takes the tangent and
    parameter step, which needs H_t·Z_t. Both are *oracles* the caller supplies (``val_grads=``, ``hvp=``; the meta-
    training unroll does, see ``needs_oracles``). Without them the update falls back to an oracle-free
    approximation: E = the training loss of this call (the spec's "next-batch" objective, the gradient this call
    receives plus weight decay) and A_t = I (H_t·Z_t taken as 0). The frozen face (:meth:`frozen`) is the ``marthe``
    face with the network as its ``mu_rule`` and computes both exactly.

    Memory per parameter element: as MARTHE — Z^w and d (+2n) for SGD, plus v and Z^v (+4n) for momentum, plus m, v,
    Z^m, Z^v (+6n) for Adam; the scalars are O(1). θ: 2·(8·hidden + hidden + hidden + 1) floats (322 at hidden = 16).
    Work: MARTHE's (one Hessian-vector product and one validation gradient per step) plus a network on 8 numbers.
    """

    needs_oracles: ClassVar[bool] = True
    group_fields: ClassVar[tuple[str, ...]] = ("step", "lr_change", "hypergrad_lr", "damping", "horizon", "delta_lr")

    def __init__(self, base: str = "momentum", lr: float | None = None, hypergrad_lr: float = 0.0,
                 adapt_hypergrad_lr: float | None = 1e-6, *, momentum: float | None = None,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 hidden: int = 16):
        super().__init__()
        if base not in _MU_STATES:
            raise ValueError(f"Invalid base: {base!r} (expected one of {tuple(_MU_STATES)})")
        lr = DEFAULT_LR[base] if lr is None else float(lr)
        if base == "momentum":
            momentum = DEFAULT_MOMENTUM if momentum is None else float(momentum)
            check_range("momentum value", momentum, 0.0, 1.0, high_open=True)
        elif momentum not in (None, 0, 0.0):
            raise ValueError(f"Invalid momentum: {momentum!r} (base {base!r} has no momentum; use base='momentum')")
        else:
            momentum = 0.0
        check_range("learning rate", lr)
        check_range("hypergrad_lr", hypergrad_lr)
        if adapt_hypergrad_lr is not None:
            check_range("adapt_hypergrad_lr", adapt_hypergrad_lr)
        check_betas(tuple(betas))
        check_range("epsilon value", eps)
        check_range("weight_decay value", weight_decay)
        self.base, self.lr, self.hypergrad_lr = base, lr, float(hypergrad_lr)
        self.adapt_hypergrad_lr = None if adapt_hypergrad_lr is None else float(adapt_hypergrad_lr)
        self.momentum, self.betas, self.eps = momentum, (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay = float(weight_decay)
        self._store_config(base=base, lr=lr, hypergrad_lr=self.hypergrad_lr,
                           adapt_hypergrad_lr=self.adapt_hypergrad_lr, momentum=momentum, betas=list(self.betas),
                           eps=self.eps, weight_decay=self.weight_decay, hidden=hidden)
        self.net = MirroredMLP(MU_FEATURES, hidden, 1)

    def rule(self) -> MartheRule:
        """The hand-designed rule this optimizer wraps (μ comes from :meth:`damping` through its ``mu=`` hook)."""
        return MartheRule(lr=self.lr, hypergrad_lr=self.hypergrad_lr, base=self.base, momentum=self.momentum,
                          betas=self.betas, eps=self.eps, weight_decay=self.weight_decay, mu="adaptive",
                          adapt_hypergrad_lr=self.adapt_hypergrad_lr)

    # -- the damping network ------------------------------------------------------------------------------------------

    def correction(self, features: Tensor) -> Tensor:
        """z(x), a 0-d float64 tensor (exactly 0 at θ init)."""
        return self.net(features.to(next(self.net.parameters()))).to(F64).reshape(())

    def damping(self, diag: MartheDiagnostics) -> Tensor:
        """μ_{t+1} = clip(h_μ + z, 0, 1) on tensor diagnostics (the functional path; differentiable). The clip keeps
        the derivative at its edges (``torch.where`` instead of ``clamp``, whose derivative there is 0)."""
        mu = h_mu(diag.q_tilde, diag.horizon) + self.correction(mu_features(diag))
        return torch.where(mu < 0, torch.zeros_like(mu), torch.where(mu > 1, torch.ones_like(mu), mu))

    @torch.no_grad()
    def damping_rule(self, diag: MartheDiagnostics) -> float:
        """The same μ_{t+1} on the ``marthe`` face's float diagnostics (its ``mu_rule``): h_μ in the face's own float
        arithmetic plus z, so at θ init it returns exactly what ``marthe`` computes."""
        z = float(self.correction(mu_features(diag)).cpu())
        return min(max(h_mu(diag.q_tilde, diag.horizon) + z, 0.0), 1.0)

    # -- state ------------------------------------------------------------------------------------------------------

    def init(self, params: Params) -> NamedTuple:
        state = self.rule().init(params)
        like = next(iter(params.values()))
        return self._from_rule_state(state, self.lr, torch.zeros((), dtype=torch.int64, device=like.device),
                                     list(params), like.device)

    def _from_rule_state(self, state: Any, lr: float | Tensor, step: Tensor, names: list[str],
                         device: torch.device) -> NamedTuple:
        cls = _MU_STATES[self.base][0]
        scalar = lambda x: torch.as_tensor(x, dtype=F64, device=device)  # noqa: E731
        values = dict(step=_replicate(step, names), lr_change=_replicate(scalar(state.lr) - lr, names),
                      **{f: _replicate(scalar(getattr(state, f)), names) for f in _HYPER_FIELDS[1:]})
        values.update({f: dict(getattr(state, f)) for f in cls._fields[6:]})
        return cls(**values)

    def _to_rule_state(self, state: NamedTuple, lr: float | Tensor, step: int) -> Any:
        cls = _MU_STATES[self.base][1]
        return cls(step=step, lr=lr + _first(state.lr_change),
                   **{f: _first(getattr(state, f)) for f in _HYPER_FIELDS[1:]},
                   **{f: getattr(state, f) for f in cls._fields[6:]})

    # -- unroll protocol ----------------------------------------------------------------------------------------------

    def static_step(self, state: NamedTuple) -> int | None:
        """The step count as a Python int for the Adam base (bias corrections), else None; see the module docstring."""
        if self.base != "adam":
            return None
        return int(_first(state.step).reshape(-1)[0])

    def hvp_vectors(self, state: NamedTuple) -> Params:
        """The vectors v whose H_t·v the next :meth:`update` needs: the tangent Z^w_t (stacked states work too)."""
        return state.tangent

    def _rule_step(self, state: NamedTuple, step: int | None) -> int:
        if self.base != "adam":
            return _RULE_STEP
        if step is not None:
            return int(step)
        try:
            return int(_first(state.step))
        except RuntimeError as err:
            raise RuntimeError(f"{type(self).__name__} over Adam needs the step count as a Python int under "
                               "torch.func.vmap: pass update(..., step=lopt.static_step(state))") from err

    # -- the update ---------------------------------------------------------------------------------------------------

    def update(self, grads: Params, state: NamedTuple, params: Params, lr: float | Tensor | None = None, *,
               step: int | None = None, hvp: Params | None = None,
               val_grads: Params | None = None) -> tuple[Params, NamedTuple]:
        """Step t: the pending hyper-step of step t−1, then the tangent and parameter step (class docstring).

        Args:
            grads: ∇L_t(w_t), the unregularized training gradient at ``params`` (the rule adds weight decay).
            state: from :meth:`init` or the previous call.
            params: w_t.
            lr: η_0 (default ``self.lr``); η_t = η_0 + the state's change.
            step: the step count as a Python int (Adam base under vmap; see :meth:`static_step`).
            hvp: H_t·Z_t for Z_t = :meth:`hvp_vectors` ``(state)`` (unregularized; None: taken as 0).
            val_grads: ∇E(w_t), the validation gradient at ``params`` (None: E = this training loss).

        Returns additive updates (w_{t+1} − w_t) and the new state. On the first call there is no pending hyper-step;
        ``torch.where`` on the state's step count keeps that decision vmap-friendly.
        """
        names = list(params)
        if set(grads) != set(params):
            raise ValueError(f"{type(self).__name__}.update needs a gradient for every parameter; missing: "
                             f"{sorted(set(params) - set(grads))}")
        lr = self.lr if lr is None else lr
        rule = self.rule()
        rule_state = self._to_rule_state(state, lr, self._rule_step(state, step))
        t = _first(state.step)

        # Finish step t−1: E's gradient at w_t (validation, or the next-batch fallback), then μ_t from the network.
        if val_grads is None:
            val_grads = {n: with_weight_decay(grads[n], params[n], self.weight_decay) for n in names}
        finished, _ = rule.hyper_step(rule_state, val_grads, mu=self.damping)
        started = t > 0
        rule_state = rule_state._replace(**{f: torch.where(started, getattr(finished, f), getattr(rule_state, f))
                                            for f in _HYPER_FIELDS})

        # Step t: tangent update (needs H_t·Z_t from the first step on) and w_{t+1} = w_t − η_t·d_t.
        if hvp is None:
            hvp = {n: torch.zeros_like(params[n]) for n in names}
        new_params, rule_state = rule.step(params, grads, rule_state, hvp=hvp)
        out = self._from_rule_state(rule_state, lr, t + 1, names, t.device)
        return {n: new_params[n] - params[n] for n in names}, out

    def frozen(self, params, lr: float | None = None, *, nonfinite: str = "skip") -> Marthe:
        """This optimizer with θ frozen: the ``marthe`` face (``step(closure, val_closure=None)``, exact oracles)
        with :meth:`damping_rule` as its ``mu_rule``; ``lr`` is η_0 (default the checkpoint's)."""
        return FrozenLearnedMarthe(params, self, lr=lr, nonfinite=nonfinite)


class FrozenLearnedMarthe(Marthe):
    """``marthe-learned-mu`` with frozen θ: :class:`~metaopt.hypergrad.marthe.Marthe` (``requires_closure``;
    ``step(closure, val_closure=None)``, state, resume and non-finite handling as ``marthe``) whose damping rule is
    the learned one. No graph is built through θ."""

    requires_closure = True

    def __init__(self, params, lopt: LearnedMuMARTHE, lr: float | None = None, *, nonfinite: str = "skip"):
        self.lopt = lopt.eval().requires_grad_(False)
        super().__init__(params, lr=lopt.lr if lr is None else lr, hypergrad_lr=lopt.hypergrad_lr, base=lopt.base,
                         momentum=lopt.momentum if lopt.base == "momentum" else None, betas=lopt.betas,
                         eps=lopt.eps, weight_decay=lopt.weight_decay, mu="adaptive",
                         adapt_hypergrad_lr=lopt.adapt_hypergrad_lr, mu_rule=self.lopt.damping_rule,
                         nonfinite=nonfinite)


__all__ = ["FrozenGroupStateOptimizer", "FrozenLearnedMarthe", "LearnedGammaCAMHD", "LearnedMuMARTHE", "MirroredMLP",
           "h_mu", "mu_features"]
