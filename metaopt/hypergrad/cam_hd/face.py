"""CAM-HD's ``torch.optim`` face: :class:`CamHD` and its registered variants :class:`CamHDSGD` (``cam-hd-sgd``),
:class:`CamHDSGDN` (``cam-hd-sgdn``) and :class:`CamHDAdam` (``cam-hd-adam``), which step through
:class:`~metaopt.hypergrad.cam_hd.rule.CamHDRule` (or its compiled form), and their registry records."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metaopt.baselines import adam_foreach_denominator
from metaopt.compiling import check_compile, compiled_step
from metaopt.core import CoreOptimizer, Params, all_finite, check_betas, check_range
from metaopt.hypergrad.cam_hd.compiled import LevelsConfig, adam_update, levels_step, sgd_update
from metaopt.hypergrad.cam_hd.gamma import GAMMA_MODES
from metaopt.hypergrad.cam_hd.layout import HYPER_DTYPE, ParamLayout
from metaopt.hypergrad.cam_hd.maths import decay_factor, rate_dtype
from metaopt.hypergrad.cam_hd.rule import CamHDAdamState, CamHDRates, CamHDRule, CamHDSGDState, CamHDState, level_rates
from metaopt.hypergrad.cam_hd.validation import (
    BETA_REDUCTIONS,
    DEFAULT_LEVELS,
    _check_choice,
    _check_level_betas,
    check_gamma,
    default_gamma,
    parse_levels,
)
from metaopt.hypergrad.hd import warn_negative_rate_once
from metaopt.registry import MemoryModel, register_optimizer

logger = logging.getLogger(__name__)


def _rate_tensors(gamma: Tensor, rates: Mapping[str, Any]) -> list[Tensor]:
    """γ and every level's rates (a tensor, or a dict of per-tensor rates) as one list, for one finiteness read."""
    tensors = [gamma]
    for level in rates.values():
        tensors.extend(level.values() if isinstance(level, dict) else [level])
    return tensors


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
            (:mod:`metaopt.hypergrad.cam_hd.compiled`: one fused pass that reduces, one that updates); equal to the
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
        """A step after the first through :mod:`~metaopt.hypergrad.cam_hd.compiled`, reading and writing the group and
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
