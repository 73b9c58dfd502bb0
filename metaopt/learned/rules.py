r"""Learned rules inside hand-designed hypergradient optimizers: a learned CAM-HD γ and a learned MARTHE μ.

Both keep the hand-designed algorithm and replace one of its heuristics with a small network over scale-free
statistics, initialized so that the optimizer *is* the hand-designed one at θ init:

* :class:`LearnedGammaCAMHD` (``cam-hd-learned-gamma``): CAM-HD (``papers/cam-hd-long.txt``, Alg. 1; spec §6) whose
  level weights γ_t come from a network instead of the δ rule (spec §6(b) step 5). At init γ_t ≡ γ₀, the paper's
  fixed weights, so it equals ``cam-hd-*`` with ``gamma_lr=0`` (the paper's fixed-γ sweep) step for step.
* :class:`LearnedMuMARTHE` (``marthe-learned-mu``): MARTHE (``papers/marthe.txt``; spec §5) whose damping μ_{t+1} is
  h_μ (App. B) plus a learned correction, zero at init — App. B's "future work": "meta-learning these update rules".

Neither copies the maths: the updates are :class:`~metaopt.hypergrad.cam_hd.CamHDRule` (its public hooks: the level
hypergradients of :meth:`~metaopt.hypergrad.cam_hd.CamHDRule.hypergradients`, then ``step(..., gamma=,
hypergradients=)``) and :class:`~metaopt.hypergrad.marthe.MartheRule` (``hyper_step(..., mu=)``, then ``step``). This
module owns the networks, their features, the state layout that lets the rules be meta-trained, and the frozen faces.

**Exact-at-init networks.** Each network is a :class:`MirroredMLP`: two identical one-hidden-layer MLPs whose outputs
are subtracted, so its output is exactly 0 for every input at init while every weight still receives a meta-gradient
(with a zero last layer, as in a plain residual init, the hidden layer would get no meta-gradient until the last layer
has moved). γ = softmax(log γ₀ + z) = γ₀ at z = 0, μ = clip(h_μ + z, 0, 1) = h_μ at z = 0.

**State layout.** A learned rule's state is a :class:`LearnedRuleState`: the hand-designed rule's own state
(``CamHDAdamState``, ``MartheMomentumState``, …, as that rule returns it) and ``lr_seen``, the rate it refers to. The
meta-trainer stacks states over instances (:func:`metaopt.tree.stack`, for ``vmap``), cuts them at the truncation
boundary with one ``tree_map(detach)`` and saves them as their list of pytree leaves (``MetaTrainer.state_dict``), so
every leaf must be a tensor — ``None`` too is a leaf of ``torch.utils._pytree``, and neither it nor a Python number
stacks. The rules' states hold a few such values, stored here as tensors:

* the step count (a Python int the rules branch on) as a 0-d int64 tensor: each call hands the rule a Python int in
  its place (``_rule_step``: the unroll's ``step=`` for the Adam bases, see ``static_step``; ``_RULE_STEP``
  otherwise) and stores the count + 1 after it;
* CAM-HD's ``negative_lr_steps`` as a 0-d int64 tensor, MARTHE's η, β, μ, c and Δη (Python floats at init) as 0-d
  float64 tensors;
* a CAM-HD level that is not used (``None`` in the rule's state) as an empty (0,) float64 tensor.

Everything else is the rule's own: the group-level quantities (γ, ∂L/∂γ, the unit / layer / global rates, MARTHE's
scalars) are stored once, as the rule keeps them, and the rates are absolute. ``lr_seen`` is the ``lr`` of the last
update: an update given another ``lr`` first multiplies every rate (CAM-HD's levels, MARTHE's η) by
``lr / lr_seen`` — as ``cam-hd-*``'s face follows an LR schedule, and as a schedule multiplies ``marthe``'s η — and
by exactly 1 when it is unchanged, so the rates then pass through untouched. :meth:`~LearnedGammaCAMHD.init` knows no
rate: its rates are 1 with ``lr_seen = 1``, and the first update scales them to exactly its ``lr`` (the checkpoint's
by default; the face's ``lr``). So ``lr`` is the initial rate α_0 (η_0), for every caller and without rounding, and
at θ init the learned rules equal the hand-designed ones bit for bit however far their rates move (an earlier layout
stored α_t − α_0, whose round trip rounded once α_t left a factor 2 of α_0). The frozen CAM-HD face keeps the
rule's per-parameter fields in ``optimizer.state[p]`` and the group-level ones once per param group, under the
names ``cam-hd-*``'s faces use (:class:`FrozenGroupStateOptimizer`).

**Unroll protocol** (read by :func:`metaopt.meta.unroll.unroll`; see its module docstring):

* ``static_step(state) -> int | None``: the Adam bases' bias corrections need the step count as a Python int, which a
  vmapped call cannot read from a per-instance tensor; the unroll groups instances by it and passes ``step=`` to
  :meth:`~LearnedGammaCAMHD.step`. SGD-type bases return ``None`` (their arithmetic does not depend on it, see
  ``_RULE_STEP``).
* ``needs_oracles`` and ``hvp_vectors(state)`` (MARTHE only): the unroll also passes ``hvp=`` (H_t·Z_t of the
  training loss at w_t) and ``val_grads=`` (∇E(w_t) on a validation batch), computed outside vmap.

Both rules implement the update protocol's ``step(params, grads, state) -> (new_params, state)`` themselves, returning
the hand-designed rule's new parameters as they are; ``update`` is its additive form (``new − params``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from metaopt.baselines import with_weight_decay
from metaopt.core import FunctionalOptimizer, check_betas, check_range, to_group_values
from metaopt.hypergrad.cam_hd import (DEFAULT_LEVELS, CamHDHypergradients, CamHDRule, ParamLayout, check_gamma,
                                      default_gamma, level_rates, parse_levels)
from metaopt.hypergrad.marthe import DEFAULT_LR, DEFAULT_MOMENTUM, Marthe, MartheDiagnostics, MartheRule
from metaopt.learned.base import FrozenLearnedOptimizer, LearnedOptimizer, Params, register_learned
from metaopt.numerics import TINY, safe_div, safe_sqrt

F64 = torch.float64

# SGD-type bases hand the rules a fixed Python step count ≥ 1. Their only step-dependent branches are first-step
# shortcuts (d_0 = 0 ⇒ h_1 = 0; torch's momentum buffer starts at g_1; Z_0 = 0 ⇒ no H·Z), and from the zero-filled
# state that init() builds the non-first branch computes the same values (0·μ + g = g, ⟨g, 0⟩ = 0, μ·0 − d = −d), so
# one vmapped call serves instances at different steps. Adam's bias corrections need the true count (static_step).
_RULE_STEP = 1


class LearnedRuleState(NamedTuple):
    """The state of a learned rule (module docstring, "State layout"): every leaf a tensor."""
    rule: Any        # the hand-designed rule's state (CamHDAdamState, MartheSGDState, …), its Python values as tensors
    lr_seen: Tensor  # the lr of the last update, which the rates refer to; 1 before the first. 0-d float64


def _lr_tensor(lr: float | Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(lr, dtype=F64, device=like.device)


def _rate_factor(lr: Tensor, lr_seen: Tensor) -> Tensor:
    """``lr / lr_seen``, and exactly 1 where they are equal (a 0-d float64 tensor; vmap-friendly)."""
    return torch.where(lr == lr_seen, torch.ones_like(lr), lr / lr_seen)


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
# The frozen face for the learned CAM-HD γ: the rule's group-level state stored once per param group


class FrozenGroupStateOptimizer(FrozenLearnedOptimizer):
    """:class:`~metaopt.learned.base.FrozenLearnedOptimizer` for :class:`LearnedGammaCAMHD`, whose state is a
    :class:`LearnedRuleState` around a CAM-HD state with group-level fields.

    The rule's per-parameter fields (its dicts: ``alpha_param``, Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's
    ``momentum_buffer`` / ``prev_direction``) live in ``optimizer.state[p]`` as usual; the group-level ones (``step``,
    ``gamma``, ``gamma_grad``, ``alpha_unit``, ``alpha_layer``, ``alpha_global``, ``negative_lr_steps``, and
    ``lr_seen``) are stored once, in ``param_groups[i][field]`` as Python numbers / lists (the keys ``cam-hd-*``'s
    faces use, ``None`` for an unused level), visible to users and exact through ``state_dict()``. Keeping the
    float64 γ and rates out of ``optimizer.state`` matters: ``torch.optim.Optimizer.load_state_dict`` casts
    floating-point per-parameter state to the parameter's dtype, which would round them to float32 on a float32
    model and break exact resume. ``param_groups[i]["lr"]`` is α_0; an LR scheduler that changes it scales every
    level's rate by new / old at the next step (:class:`LearnedRuleState`'s ``lr_seen``). All parameters of a group
    are expected to receive gradients together (as every metaopt face assumes).
    """

    def rule(self, group: dict[str, Any]) -> FunctionalOptimizer:
        self._lopt_on(group["params"][0].device)
        return _FrozenGammaRule(self.lopt, group["lr"], group.get("step", 0))

    def load_rule_state(self, group: dict[str, Any], rule: FunctionalOptimizer, params: Params) -> LearnedRuleState:
        """The state from ``optimizer.state`` and the group. ``init`` runs only for the first step, or where some
        parameter has no state yet (its fresh rates then start at the group's ``lr_seen``, where the others are)."""
        if "step" in group and "lr_seen" not in group:
            raise ValueError(f"{type(self).__name__}: param group {self.param_groups.index(group)} holds a state of "
                             "an earlier metaopt (rates stored as α − α_0, no 'lr_seen'), which this face cannot "
                             "resume; start the optimizer afresh")
        missing = {n: p for n, p in params.items() if not self.state[p]}
        layout = self._layouts.get(id(group))
        fresh = None
        if missing or layout is None or "lr_seen" not in group:
            fresh = rule.init(missing if missing else params)
            if "lr_seen" in group:
                fresh = self.lopt.at_lr(fresh, group["lr_seen"])
            layout = (type(fresh.rule), [(f, isinstance(v, dict), None if isinstance(v, dict) else v)
                                         for f, v in zip(fresh.rule._fields, fresh.rule)])
            self._layouts[id(group)] = layout
        if "lr_seen" not in group:  # before the first step: the fresh state as it is
            return fresh
        state_type, fields = layout
        values = {}
        for field, per_parameter, like in fields:
            if per_parameter:
                values[field] = {n: (getattr(fresh.rule, field)[n] if n in missing else self.state[p][field])
                                 for n, p in params.items()}
            else:
                stored = [] if group[field] is None else group[field]  # None: an unused level, stored as (0,)
                values[field] = torch.as_tensor(stored, dtype=like.dtype, device=like.device)
        lr_seen = torch.as_tensor(group["lr_seen"], dtype=F64, device=next(iter(params.values())).device)
        return LearnedRuleState(state_type(**values), lr_seen)

    def store_rule_state(self, group: dict[str, Any], params: Params, state: LearnedRuleState) -> None:
        group_fields = [("lr_seen", state.lr_seen)]
        for field, value in zip(state.rule._fields, state.rule):
            if isinstance(value, dict):
                for n, p in params.items():
                    self.state[p][field] = value[n]
            else:
                group_fields.append((field, value))
        group.update({field: None for field, value in group_fields if value.numel() == 0})  # an unused level
        group_fields = [(field, value) for field, value in group_fields if value.numel() > 0]
        for (field, _), value in zip(group_fields, to_group_values([v for _, v in group_fields])):
            group[field] = value


class _FrozenGammaRule(FunctionalOptimizer):
    """The frozen face's rule for one step of a group: :meth:`LearnedGammaCAMHD.step` at the group's ``lr``, given
    the group's step count as the Python int it already is (the Adam base's bias corrections then read nothing back
    from the state's count tensor)."""

    def __init__(self, lopt: LearnedGammaCAMHD, lr: float, step: int):
        self.lopt, self.lr, self.count = lopt, lr, step

    def init(self, params: Params) -> LearnedRuleState:
        return self.lopt.init(params)

    def step(self, params: Params, grads: Params, state: LearnedRuleState) -> tuple[Params, LearnedRuleState]:
        return self.lopt.step(params, grads, state, lr=self.lr, step=self.count)


# ----------------------------------------------------------------------------------------------------------------------
# CAM-HD with a learned γ


_ALPHA_FIELDS = {"parameter": "alpha_param", "unit": "alpha_unit", "layer": "alpha_layer", "global": "alpha_global"}

GAMMA_BASES = ("sgd", "sgdn", "adam")
# Paper values, as the hand-designed faces (cam-hd-sgd / cam-hd-sgdn / cam-hd-adam): β per base
DEFAULT_HYPERGRAD_LR = {"sgd": 1e-3, "sgdn": 1e-3, "adam": 1e-7}
GAMMA_TIME_SCALES = (10.0, 100.0, 1000.0)  # progress features tanh(t/τ): the horizon is unknown to an optimizer


class _StepFirstRule(LearnedOptimizer):
    """A learned rule that implements the update protocol's :meth:`step` itself (the hand-designed rule returns new
    parameters); :meth:`update` is its additive form, new − old parameters, for callers of that form."""

    def update(self, grads: Params, state: LearnedRuleState, params: Params, lr: float | Tensor | None = None,
               **extra: Any) -> tuple[Params, LearnedRuleState]:
        new_params, state = self.step(params, grads, state, lr, **extra)
        return {n: new_params[n] - params[n] for n in params}, state


@register_learned("cam-hd-learned-gamma")
class LearnedGammaCAMHD(_StepFirstRule):
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
        lr: α_0, the initial rate of every level (paper 1e-3): the ``lr`` given to :meth:`step` or to the frozen
            face (default this one) is the rate the first step starts from; changing it later scales every level's
            rate by new / old, as ``cam-hd-*``'s face follows an LR schedule (module docstring, "State layout").
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

    Memory per parameter element: CamHDRule's — the parameter-level rate α_p (+n when that level is used), plus
    d_{t−1} (+n) for SGD, v and d_{t−1} (+2n) for SGDN, m and v (+2n) for Adam; the unit / layer / global rates, γ
    and ∂L/∂γ are O(units + layers + K), stored once. θ: 2·((4K + 5)·hidden + hidden + hidden·K + K) floats (1,350
    at K = 3, hidden = 32). Work: CamHDRule's step plus one more O(n) pass for the features (the level hypergradients
    are the step's own, from :meth:`CamHDRule.hypergradients`) and one to bring α_p to the step's ``lr``
    (:meth:`at_lr`); no extra forward / backward pass.
    """

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

    def init(self, params: Params) -> LearnedRuleState:
        """CamHDRule's initial state in units of the first update's ``lr``: every rate 1, ``lr_seen = 1`` (module
        docstring, "State layout"), γ = γ₀, the moments / directions zero."""
        layout = self.layout(params)
        state = self.rule(1.0, layout).init(params)
        if self.momentum > 0:  # a zero buffer instead of torch's "None" placeholder: see _RULE_STEP
            state = state._replace(momentum_buffer={n: torch.zeros_like(p) for n, p in params.items()})
        like = next(iter(params.values()))
        return LearnedRuleState(self._stored(state, torch.zeros((), dtype=torch.int64, device=like.device)),
                                torch.ones((), dtype=F64, device=like.device))

    def _stored(self, rule_state: Any, step: Tensor) -> Any:
        """CamHDRule's state as this optimizer stores it: the step count ``step`` (a tensor), ``negative_lr_steps``
        as a tensor, an unused level's rates as an empty (0,) tensor (module docstring)."""
        device = step.device
        negative = rule_state.negative_lr_steps
        values = dict(step=step, negative_lr_steps=(negative if isinstance(negative, Tensor) else
                                                    torch.tensor(negative, dtype=torch.int64, device=device)))
        values.update({field: torch.zeros(0, dtype=F64, device=device)
                       for level, field in _ALPHA_FIELDS.items() if level not in self.levels})
        return rule_state._replace(**values)

    def _for_rule(self, stored: Any, step: int) -> Any:
        """The stored state as CamHDRule takes it: ``step`` a Python int, ``None`` for an unused level."""
        return stored._replace(step=step, **{field: None for level, field in _ALPHA_FIELDS.items()
                                             if level not in self.levels})

    def at_lr(self, state: LearnedRuleState, lr: float | Tensor) -> LearnedRuleState:
        """``state`` with its rates in units of ``lr``: every level's rates times ``lr / lr_seen`` (exactly 1, the
        rates untouched, when ``lr`` is the state's ``lr_seen``), and ``lr_seen = lr``."""
        lr = _lr_tensor(lr, state.lr_seen)
        factor = _rate_factor(lr, state.lr_seen)
        rates = {}
        for level, value in level_rates(state.rule, self.levels).items():
            if level == "parameter":
                rates[_ALPHA_FIELDS[level]] = {n: a * factor.to(a.dtype) for n, a in value.items()}
            else:
                rates[_ALPHA_FIELDS[level]] = value * factor
        return LearnedRuleState(state.rule._replace(**rates), lr)

    def static_step(self, state: LearnedRuleState) -> int | None:
        """The step count as a Python int where the arithmetic needs it (Adam's bias corrections), else None. Reads
        one instance's state (a stacked one gives instance 0's count). Unroll protocol, see the module docstring."""
        if self.base != "adam":
            return None
        return int(state.rule.step.reshape(-1)[0])

    def _rule_step(self, state: LearnedRuleState, step: int | None) -> int:
        if self.base != "adam":
            return _RULE_STEP
        if step is not None:
            return int(step)
        try:
            return int(state.rule.step)
        except RuntimeError as err:  # a per-instance tensor under vmap has no Python value
            raise RuntimeError(f"{type(self).__name__} over Adam needs the step count as a Python int under "
                               "torch.func.vmap: pass step=lopt.static_step(state) to its step() or update() "
                               "(metaopt.meta.unroll does, grouping instances by it)") from err

    # -- the γ network ------------------------------------------------------------------------------------------------

    def features(self, hypergradients: CamHDHypergradients, state: LearnedRuleState, layout: ParamLayout,
                 lr: float | Tensor) -> Tensor:
        """The (4K + 5,) float64 feature vector x_t (class docstring) from steps 1–2 of the step
        (:meth:`CamHDRule.hypergradients`, which the step then reuses) and the state before the step, its rates in
        units of ``lr`` (:meth:`at_lr`); differentiable, vmap-friendly."""
        names = layout.names  # every parameter has a gradient (step checks), so live == names
        effective, prev, h = hypergradients.effective, hypergradients.prev_directions, hypergradients.h
        rule_state = state.rule
        like = rule_state.gamma
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
        for level, alpha in level_rates(rule_state, self.levels).items():
            if level == "parameter":
                total = zero
                for t in h[level].values():
                    total = total + t.abs().sum(dtype=F64)
                mean_rate = zero
                for n in names:
                    mean_rate = mean_rate + alpha[n].sum(dtype=F64)
                mean_rate = mean_rate / layout.numel
            else:
                total = h[level].abs().sum()
                mean_rate = alpha.mean()
            coherence.append(safe_div(total, l1))
            mean_rates.append(mean_rate)
        cosine = safe_div(dot, safe_sqrt(g2 * d2))

        gamma_grad = rule_state.gamma_grad
        gamma_grad = safe_div(gamma_grad, gamma_grad.abs().sum().expand_as(gamma_grad))
        rates = torch.stack(mean_rates)
        log_rates = torch.log(rates.abs() + TINY)
        rate_logs = (log_rates - log_rates.mean()).clamp(-10.0, 10.0)
        gamma_prev = rule_state.gamma
        alpha0 = torch.as_tensor(lr, dtype=F64, device=like.device).abs()
        drift = (torch.log((gamma_prev * rates).sum().abs() + TINY) - torch.log(alpha0 + TINY)).clamp(-10.0, 10.0)
        gamma0 = torch.tensor(self.gamma0, dtype=F64, device=like.device)
        gamma_rel = (torch.log(gamma_prev + TINY) - torch.log(gamma0)).clamp(-10.0, 10.0)
        t = rule_state.step.to(F64)
        progress = torch.stack([torch.tanh(t / tau) for tau in GAMMA_TIME_SCALES])
        return torch.cat([torch.stack(coherence), cosine.reshape(1), gamma_grad, rate_logs, drift.reshape(1),
                          gamma_rel, progress])

    def gamma_weights(self, features: Tensor) -> Tensor:
        """γ = softmax(log γ₀ + z(x)) as γ₀·e^{z − max z} / Σ γ₀·e^{z − max z}: exactly γ₀ where z = 0 (θ init)."""
        z = self.net(features.to(next(self.net.parameters()))).to(F64)
        weights = torch.tensor(self.gamma0, dtype=F64, device=z.device) * torch.exp(z - z.max())
        return weights / weights.sum()

    # -- the step -----------------------------------------------------------------------------------------------------

    def step(self, params: Params, grads: Params, state: LearnedRuleState, lr: float | Tensor | None = None, *,
             step: int | None = None) -> tuple[Params, LearnedRuleState]:
        """One CAM-HD step with the network's γ_t: ``(new_params, new_state)``, the new parameters CamHDRule's own.

        ``lr``: α_0 (default ``self.lr``; see the module docstring for a state last stepped at another rate).
        ``step``: the step count as a Python int (Adam base under vmap; see :meth:`static_step`). Every parameter
        needs a gradient (the level groupings are over the parameter set).
        """
        if set(grads) != set(params):
            raise ValueError(f"{type(self).__name__}.step needs a gradient for every parameter (the level "
                             f"groupings are over the whole set); missing: {sorted(set(params) - set(grads))}")
        lr = self.lr if lr is None else lr
        layout = self.layout(params)
        for level in set(self.levels) & {"unit", "layer"}:
            stored = getattr(state.rule, _ALPHA_FIELDS[level]).shape[-1]
            if stored != layout.num_groups(level):
                raise ValueError(f"{type(self).__name__}: the state has {stored} {level} rates but these parameters "
                                 f"form {layout.num_groups(level)} {level}s; the parameter set changed since init "
                                 "(on the frozen face: every parameter of a group needs a gradient at every step)")
        rule = self.rule(lr, layout)
        state = self.at_lr(state, lr)
        rule_state = self._for_rule(state.rule, self._rule_step(state, step))
        hypergradients = rule.hypergradients(params, grads, rule_state)  # once: the features and the step share them
        gamma = self.gamma_weights(self.features(hypergradients, state, layout, lr))
        new_params, new_rule_state = rule.step(params, grads, rule_state, gamma=gamma, hypergradients=hypergradients)
        return new_params, state._replace(rule=self._stored(new_rule_state, state.rule.step + 1))

    def frozen(self, params, lr: float | None = None, *, nonfinite: str = "skip") -> torch.optim.Optimizer:
        """This optimizer with θ frozen, as a ``torch.optim.Optimizer`` (the generic learned face; γ, the group-level
        rates and the step count are kept in ``param_groups[i]``, see :class:`FrozenGroupStateOptimizer`). Pass
        ``model.named_parameters()`` so that layers follow the modules; ``lr`` is α_0 (default the checkpoint's)."""
        return FrozenGroupStateOptimizer(params, self, lr=lr, nonfinite=nonfinite)


# ----------------------------------------------------------------------------------------------------------------------
# MARTHE with a learned damping μ


MU_BASES = ("sgd", "momentum", "adam")
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
    a, b = safe_div(delta, scale), safe_div(delta_prev, scale)
    agreement = safe_div(2 * a * b, a * a + b * b)
    contrast = safe_div(a.abs() - b.abs(), a.abs() + b.abs())
    return torch.stack([q_tilde, torch.tanh(ratio), torch.log1p(horizon), damping, h_mu(q_tilde, horizon),
                        agreement, contrast, torch.tanh(safe_div(-step_size, lr_now))])


MU_FEATURES = 8


@register_learned("marthe-learned-mu")
class LearnedMuMARTHE(_StepFirstRule):
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
        lr: η_0 (default 0.1 for momentum, 0.01 for SGD, 3e-4 for Adam), the rate the first step starts from
            (module docstring, "State layout").
        hypergrad_lr: β_0 (0: Alg. 1 "requires β_0 = 0").
        adapt_hypergrad_lr: β_hyper (1e-6, the authors' code), or None for a fixed β.
        momentum, betas, eps, weight_decay: the base's (weight decay is in L and H, not in E, A-M6).
        hidden: width of the network's hidden layer (each branch).

    The hyper-learning-rate update stays the paper's; only μ is learned.

    Functional use, one call per step (:meth:`step`): the call for step t first finishes step t−1 — its hyper-step
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

    def __init__(self, base: str = "momentum", lr: float | None = None, hypergrad_lr: float = 0.0,
                 adapt_hypergrad_lr: float | None = 1e-6, *, momentum: float | None = None,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 hidden: int = 16):
        super().__init__()
        if base not in MU_BASES:
            raise ValueError(f"Invalid base: {base!r} (expected one of {MU_BASES})")
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

    def init(self, params: Params) -> LearnedRuleState:
        """MartheRule's initial state in units of the first update's ``lr`` (η = 1, ``lr_seen = 1``; module
        docstring, "State layout"), its scalars as 0-d float64 tensors and the step count as a 0-d int64 one."""
        state = self.rule().init(params)
        like = next(iter(params.values()))
        scalar = lambda x: torch.as_tensor(x, dtype=F64, device=like.device)  # noqa: E731
        rule_state = state._replace(step=torch.zeros((), dtype=torch.int64, device=like.device), lr=scalar(1.0),
                                    **{f: scalar(getattr(state, f)) for f in _HYPER_FIELDS[1:]})
        return LearnedRuleState(rule_state, scalar(1.0))

    # -- unroll protocol ----------------------------------------------------------------------------------------------

    def static_step(self, state: LearnedRuleState) -> int | None:
        """The step count as a Python int for the Adam base (bias corrections), else None; see the module docstring."""
        if self.base != "adam":
            return None
        return int(state.rule.step.reshape(-1)[0])

    def hvp_vectors(self, state: LearnedRuleState) -> Params:
        """The vectors v whose H_t·v the next :meth:`step` needs: the tangent Z^w_t (stacked states work too)."""
        return state.rule.tangent

    def _rule_step(self, state: LearnedRuleState, step: int | None) -> int:
        if self.base != "adam":
            return _RULE_STEP
        if step is not None:
            return int(step)
        try:
            return int(state.rule.step)
        except RuntimeError as err:
            raise RuntimeError(f"{type(self).__name__} over Adam needs the step count as a Python int under "
                               "torch.func.vmap: pass step=lopt.static_step(state) to its step() or update()") from err

    # -- the step -----------------------------------------------------------------------------------------------------

    def step(self, params: Params, grads: Params, state: LearnedRuleState, lr: float | Tensor | None = None, *,
             step: int | None = None, hvp: Params | None = None,
             val_grads: Params | None = None) -> tuple[Params, LearnedRuleState]:
        """Step t: the pending hyper-step of step t−1, then the tangent and parameter step (class docstring).

        Args:
            params: w_t.
            grads: ∇L_t(w_t), the unregularized training gradient at ``params`` (the rule adds weight decay).
            state: from :meth:`init` or the previous call.
            lr: η_0 (default ``self.lr``); η_t is the state's, times ``lr / lr_seen`` (module docstring).
            step: the step count as a Python int (Adam base under vmap; see :meth:`static_step`).
            hvp: H_t·Z_t for Z_t = :meth:`hvp_vectors` ``(state)`` (unregularized; None: taken as 0).
            val_grads: ∇E(w_t), the validation gradient at ``params`` (None: E = this training loss).

        Returns w_{t+1} (MartheRule's) and the new state. On the first call there is no pending hyper-step;
        ``torch.where`` on the state's step count keeps that decision vmap-friendly.
        """
        names = list(params)
        if set(grads) != set(params):
            raise ValueError(f"{type(self).__name__}.step needs a gradient for every parameter; missing: "
                             f"{sorted(set(params) - set(grads))}")
        lr = _lr_tensor(self.lr if lr is None else lr, state.lr_seen)
        rule = self.rule()
        t = state.rule.step
        rule_state = state.rule._replace(step=self._rule_step(state, step),
                                         lr=state.rule.lr * _rate_factor(lr, state.lr_seen))

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
        return new_params, LearnedRuleState(rule_state._replace(step=t + 1), lr)

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


__all__ = ["FrozenGroupStateOptimizer", "FrozenLearnedMarthe", "LearnedGammaCAMHD", "LearnedMuMARTHE",
           "LearnedRuleState", "MirroredMLP", "h_mu", "mu_features"]
