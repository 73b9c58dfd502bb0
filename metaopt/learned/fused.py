"""Fused meta-training cells: coordinatewise updates with a hand-written backward, for truncated BPTT on a CPU.

Meta-training differentiates through every inner update. Through the reference ``step_flat`` autograd keeps some
thirty (n, J) intermediates per update and instance (HyperAdam, J = 20: ~2.2 GB above the task for two instances of
the paper's MLP over a 20-step truncation) and runs ~60 unfused elementwise kernels per update on (n, J) tensors laid
out coordinate-major, where the gate slices are strided. The cells here instead:

* keep the state of all instances of a meta-batch in one (..., n, width) tensor per field for the whole truncation
  (leading batch dimensions, then the coordinates of all the learner's tensors, then the width), converted from and
  to the per-tensor dicts once per truncation instead of concatenated and split at every update; each layer is ONE
  matrix product of the (..., n, in) input viewed as (instances·n, in) with the weight, the weight gradients one
  product each too (the coordinates of all instances are the long GEMM dimension; measured on a 2-core AMD EPYC,
  this orientation runs MKL's skinny products 1.5-2x faster than the transposed one);
* save **only their inputs** (the carried state is kept anyway: it is the next update's input) and recompute the
  forward in the backward, which then applies the derivatives written out below — one cell forward more per update,
  no per-step intermediates kept;
* reduce "over the whole gradient" along the last dimension only (per instance), so the unroll calls them once for
  all instances, outside ``vmap``; they also run under ``torch.func.vmap``.

They are the same maths as the reference ``step_flat`` (tests: outputs and meta-gradients against autograd through the
reference within float32 rounding, float64 ``gradcheck``, and under ``vmap``). :func:`to_meta_layout` /
:func:`from_meta_layout` convert a reference state (a NamedTuple of dicts of (*shape, width) tensors, stacked over
instances) once per truncation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt.compiling import COMPILE_FAILED, compile_with_fallback
from metaopt.learned.cells import ACCUMULATOR_EPS
from metaopt.numerics import TINY

Params = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# Layout


def to_meta_layout(state: NamedTuple, names: Sequence[str], lead: int) -> tuple[Tensor, ...]:
    """Fields of ``state`` (dicts of (*lead_shape, *shape, width) tensors) as (*lead_shape, n, width) tensors, the
    coordinates of ``names`` concatenated in order. ``lead`` is the number of leading batch dimensions."""
    return tuple(torch.cat([field[n].flatten(lead, -2) for n in names], dim=-2) for field in state)


def from_meta_layout(fields: Sequence[Tensor], state_type: type, like: Params, names: Sequence[str],
                     lead: int) -> NamedTuple:
    """Inverse of :func:`to_meta_layout`: (*lead_shape, n, width) fields back to dicts shaped like ``like`` plus the
    width (``like[n]`` has the leading dimensions too)."""
    sizes = [like[n][(0,) * lead].numel() for n in names]
    return state_type(*({n: piece.reshape(*like[n].shape, flat.shape[-1])
                         for n, piece in zip(names, flat.split(sizes, dim=-2))} for flat in fields))


def flatten_coordinates(tensors: Sequence[Tensor], lead: int) -> Tensor:
    """(*lead_shape, n): the coordinates of ``tensors`` (each (*lead_shape, *shape)) concatenated."""
    return torch.cat([t.flatten(lead) if t.dim() > lead else t.unsqueeze(-1) for t in tensors], dim=-1)


def _linear(weight: Tensor, x: Tensor) -> Tensor:
    """``weight`` (out, in) applied to every coordinate of ``x`` (..., n, in): one matrix product."""
    return (x.reshape(-1, x.shape[-1]) @ weight.T).view(*x.shape[:-1], weight.shape[0])


def _weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    """Σ over instances and coordinates of dy xᵀ: the gradient of ``_linear``'s weight, (out, in)."""
    return dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _row_sum(t: Tensor) -> Tensor:
    """(width,): ``t`` (..., width) summed over everything else (a bias gradient)."""
    return t.reshape(-1, t.shape[-1]).sum(0)


def _rms_denominator(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(mean of x² over the coordinates ``dim``, √(mean + TINY)): the denominator of ``cells.rms_normalize``."""
    q = (x * x).mean(dim=dim, keepdim=True)
    return q, torch.sqrt(q + TINY)


def _rms_backward(dx_normalized: Tensor, x: Tensor, q: Tensor, root: Tensor, dim: int) -> Tensor:
    """Gradient w.r.t. x of x / √(mean(x²) + TINY) over ``dim``, given the gradient of the normalized x; zero
    through the root where mean(x²) == 0 (``numerics.safe_sqrt``)."""
    normalized = x / root
    droot = -(dx_normalized * normalized).sum(dim=dim, keepdim=True) / root
    dq = torch.where(q > 0, droot / (2 * root), torch.zeros_like(droot))
    return dx_normalized / root + dq * (2.0 / x.shape[dim]) * x


def _elu_grad(out: Tensor) -> Tensor:
    """ELU'(pre) from its output out = ELU(pre): 1 where pre > 0 (⟺ out > 0), exp(pre) = out + 1 elsewhere."""
    return torch.where(out > 0, torch.ones_like(out), out + 1)


# ----------------------------------------------------------------------------------------------------------------------
# HyperAdam (metaopt.learned.hyperadam, Alg. 2): StateCell with preprocessing and LSTM, AdamCell, WeightCell


class HyperAdamTheta(NamedTuple):
    """HyperAdam's θ as the fused cell takes it (weights are (out, in), as in nn.Linear), with the layers that read
    the same input stacked so that each is one matrix product with an inner dimension of 2J (measured: ~1.3x the
    throughput of two products with J)."""

    pre_weight: Tensor    # (J, 1)
    pre_bias: Tensor      # (J,)
    lstm_weight: Tensor   # (4J, 2J): [W_ih, W_hh], columns x then s
    lstm_bias: Tensor     # (4J,)
    decay_weight: Tensor  # (2J, 2J): rows θ_u then θ_r; columns m' then s
    decay_bias: Tensor    # (2J,)
    rho_weight: Tensor    # (J, J)
    rho_bias: Tensor      # (J,)


def hyperadam_theta(lopt) -> HyperAdamTheta:
    """The fused cell's view of a :class:`~metaopt.learned.hyperadam.HyperAdam` (with LSTM and preprocessing);
    differentiable: gradients reach the module's own parameters through the concatenations."""
    return HyperAdamTheta(lopt.pre.weight, lopt.pre.bias, torch.cat([lopt.lstm.weight_ih, lopt.lstm.weight_hh], 1),
                          lopt.lstm.bias, torch.cat([lopt.decay_beta.weight, lopt.decay_gamma.weight]),
                          torch.cat([lopt.decay_beta.bias, lopt.decay_gamma.bias]), lopt.weight.weight,
                          lopt.weight.bias)


def _hyperadam_forward(grad: Tensor, state: Sequence[Tensor], theta: HyperAdamTheta, eps: float,
                       normalize_state: bool = False, keep: bool = False) -> tuple[Any, ...]:
    """HyperAdam's step (module docstring of :mod:`metaopt.learned.hyperadam`) in the meta layout: ``grad``
    (..., n), ``state`` = (s, c, m, v, β̂, γ̂) each (..., n, J). Returns (d, *new_state), and with ``keep`` also the
    intermediates the backward needs. ``normalize_state``: s / rms(s) per candidate before the decay layers."""
    s0, c0, m0, v0, bh0, gh0 = state
    J = m0.shape[-1]
    # StateCell: ĝ = g / rms(g); x = ELU(W_p ĝ + b_p); (s, c) = LSTM(x, (s0, c0))
    qg, rg = _rms_denominator(grad, -1)
    gn = (grad / rg).unsqueeze(-1)                                         # (..., n, 1)
    pre_weight = theta.pre_weight.squeeze(-1)
    pre = gn * pre_weight + theta.pre_bias                                 # (..., n, J)
    x = F.elu(pre)
    xs = torch.cat([x, s0], dim=-1)
    gates = _linear(theta.lstm_weight, xs) + theta.lstm_bias               # (..., n, 4J): i, f, g, o
    si, sf, gg, so = gates.chunk(4, dim=-1)
    si, sf, so, tg = torch.sigmoid(si), torch.sigmoid(sf), torch.sigmoid(so), torch.tanh(gg)
    c = sf * c0 + si * tg
    tc = torch.tanh(c)
    s = so * tc
    # AdamCell: m' = tanh(m0 / rms(m0)) per candidate; β, γ = σ([m', s] θ + b)
    qm, rm = _rms_denominator(m0, -2)
    mt = torch.tanh(m0 / rm)
    qs, rs = _rms_denominator(s, -2) if normalize_state else (None, None)
    features = torch.cat([mt, s / rs if normalize_state else s], dim=-1)
    z = _linear(theta.decay_weight, features) + theta.decay_bias           # (..., n, 2J)
    beta, gamma = torch.sigmoid(z).chunk(2, dim=-1)
    g = grad.unsqueeze(-1)
    m = beta * m0 + (1 - beta) * g
    v = gamma * v0 + (1 - gamma) * (g * g)
    bh = beta * bh0 + (1 - beta)
    gh = gamma * gh0 + (1 - gamma)
    a = m / (bh + ACCUMULATOR_EPS)
    u = v / (gh + ACCUMULATOR_EPS)
    root = torch.sqrt(u + eps)
    field = a / root
    # WeightCell: ρ = ELU(θ_q s + b_q); d = Σ_j ρ_j m̂_j
    zq = _linear(theta.rho_weight, s) + theta.rho_bias
    rho = F.elu(zq)
    direction = (rho * field).sum(dim=-1)
    out = (direction, s, c, m, v, bh, gh)
    if not keep:
        return out
    return out, dict(qg=qg, rg=rg, gn=gn, pre_weight=pre_weight, x=x, xs=xs, si=si, sf=sf, so=so, tg=tg, tc=tc, qm=qm,
                     rm=rm, mt=mt, qs=qs, rs=rs, features=features, beta=beta, gamma=gamma, g=g, a=a, u=u, root=root, field=field,
                     rho=rho)


def _hyperadam_backward(grad: Tensor, state: Sequence[Tensor], theta: HyperAdamTheta, eps: float,
                        douts: Sequence[Tensor | None], need_grad: bool,
                        normalize_state: bool = False) -> tuple[Any, ...]:
    """Gradients of the outputs' cotangents ``douts`` (for d, s, c, m, v, β̂, γ̂; None = zero) w.r.t. the inputs
    (grad if ``need_grad``, the six state fields) and θ, recomputing the forward first."""
    (_, s, _, _, _, bh, gh), k = _hyperadam_forward(grad, state, theta, eps, normalize_state, keep=True)
    s0, c0, m0, v0, bh0, gh0 = state
    J = m0.shape[-1]
    dd, ds_out, dc_out, dm_out, dv_out, dbh_out, dgh_out = douts
    zeros = torch.zeros_like(m0)

    def cot(t: Tensor | None) -> Tensor:
        return zeros if t is None else t

    # WeightCell and the combination d = Σ_j ρ_j · field_j
    dd = (torch.zeros_like(grad) if dd is None else dd).unsqueeze(-1)
    dfield = dd * k["rho"]
    dzq = dd * k["field"] * _elu_grad(k["rho"])
    ds = cot(ds_out) + _linear(theta.rho_weight.T, dzq)
    d_rho_weight, d_rho_bias = _weight_grad(dzq, s), _row_sum(dzq)
    # field = a / √(u + ε), a = m / (β̂ + δ), u = v / (γ̂ + δ) (the root's derivative is zero where u == 0: safe_sqrt)
    root = k["root"]
    da = dfield / root
    droot = -dfield * k["field"] / root
    du = torch.where(k["u"] > 0, droot / (2 * root), zeros)
    bhe, ghe = bh + ACCUMULATOR_EPS, gh + ACCUMULATOR_EPS
    dm = cot(dm_out) + da / bhe
    dbh = cot(dbh_out) - da * k["a"] / bhe
    dv = cot(dv_out) + du / ghe
    dgh = cot(dgh_out) - du * k["u"] / ghe
    # moments and bias accumulators (lines 11-14)
    beta, gamma, g = k["beta"], k["gamma"], k["g"]
    dbeta = dm * (m0 - g) + dbh * (bh0 - 1)
    dgamma = dv * (v0 - g * g) + dgh * (gh0 - 1)
    dm0, dv0, dbh0, dgh0 = dm * beta, dv * gamma, dbh * beta, dgh * gamma
    dgrad = ((dm * (1 - beta)).sum(-1) + (dv * (1 - gamma) * (2 * g)).sum(-1)) if need_grad else None
    # decay-rate layers (eqs. 4, 5)
    dz = torch.cat([dbeta * beta * (1 - beta), dgamma * gamma * (1 - gamma)], dim=-1)  # (..., n, 2J)
    mt = k["mt"]
    d_decay_weight, d_decay_bias = _weight_grad(dz, k["features"]), _row_sum(dz)
    dmt, ds_decay = _linear(theta.decay_weight.T, dz).split(J, dim=-1)
    ds = ds + (_rms_backward(ds_decay, s, k["qs"], k["rs"], -2) if normalize_state else ds_decay)
    dm0 = dm0 + _rms_backward(dmt * (1 - mt * mt), m0, k["qm"], k["rm"], -2)
    # LSTM (gate order i, f, g, o)
    si, sf, so, tg, tc = k["si"], k["sf"], k["so"], k["tg"], k["tc"]
    dc = cot(dc_out) + ds * so * (1 - tc * tc)
    dgates = torch.cat([dc * tg * si * (1 - si), dc * c0 * sf * (1 - sf), dc * si * (1 - tg * tg),
                        ds * tc * so * (1 - so)], dim=-1)                  # (..., n, 4J)
    dc0 = dc * sf
    d_lstm_weight, d_lstm_bias = _weight_grad(dgates, k["xs"]), _row_sum(dgates)
    dx, ds0 = _linear(theta.lstm_weight.T, dgates).split(J, dim=-1)
    dpre = dx * _elu_grad(k["x"])
    gn = k["gn"]
    d_pre_weight = _row_sum(dpre * gn).unsqueeze(-1)
    d_pre_bias = _row_sum(dpre)
    if need_grad:
        dgn = (dpre * k["pre_weight"]).sum(-1)                              # (..., n)
        dgrad = dgrad + _rms_backward(dgn, grad, k["qg"], k["rg"], -1)
    dtheta = HyperAdamTheta(d_pre_weight, d_pre_bias, d_lstm_weight, d_lstm_bias, d_decay_weight, d_decay_bias,
                            d_rho_weight, d_rho_bias)
    return dgrad, (ds0, dc0, dm0, dv0, dbh0, dgh0), dtheta


class HyperAdamCell(torch.autograd.Function):
    """HyperAdam's update in the meta layout, saving only its inputs: ``apply(eps, compiled, normalize_state, grad,
    *state, *theta)`` → (d, s, c, m, v, β̂, γ̂), state fields (..., n, J). The backward recomputes the forward, then applies
    :func:`_hyperadam_backward`'s derivatives; ``compiled`` runs both through :func:`bodies`.

    Saving the activations instead (the ten (n, J) outputs of the matrix products and transcendental functions) was
    measured slower, not faster: 31 vs 34 inner steps/s for hyperadam-paper at meta-batch 2 on a 2-core AMD EPYC, with
    2.08 vs 1.55 GB peak resident memory — writing and re-reading them costs more memory traffic than recomputing them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(eps: float, compiled: bool, normalize_state: bool, grad: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        forward, _ = bodies("hyperadam", compiled and not _is_batched(grad))
        return forward(grad, tensors[:6], HyperAdamTheta(*tensors[6:]), eps, normalize_state)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.eps, ctx.compiled, ctx.normalize_state = inputs[:3]
        ctx.save_for_backward(*inputs[3:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *douts: Tensor | None):
        grad, *tensors = ctx.saved_tensors
        if all(d is None for d in douts):
            return (None,) * (4 + len(tensors))
        _, backward = bodies("hyperadam", ctx.compiled and not _is_batched(grad))
        dgrad, dstate, dtheta = backward(grad, tensors[:6], HyperAdamTheta(*tensors[6:]), ctx.eps, douts,
                                         ctx.needs_input_grad[3], ctx.normalize_state)
        return (None, None, None, dgrad, *dstate, *dtheta)


def hyperadam_step(lopt, grad: Tensor, state: Sequence[Tensor], eps: float, compiled: bool = False,
                   normalize_state: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
    """HyperAdam's direction (..., n) and new state (six (..., n, J) fields) through :class:`HyperAdamCell`."""
    direction, *new_state = HyperAdamCell.apply(eps, compiled, normalize_state, grad, *state, *hyperadam_theta(lopt))
    return direction, tuple(new_state)


# ----------------------------------------------------------------------------------------------------------------------
# Compiled bodies


_EAGER: dict[str, tuple[Callable, Callable]] = {"hyperadam": (_hyperadam_forward, _hyperadam_backward)}
_COMPILED: dict[str, tuple[Callable, Callable]] = {}


def _is_batched(t: Tensor) -> bool:
    """True under ``torch.func.vmap`` (a batched tensor): the compiled bodies are for plain tensors only."""
    return torch._C._functorch.is_batchedtensor(t)


def bodies(cell: str, compiled: bool) -> tuple[Callable, Callable]:
    """The (forward, backward) bodies of ``cell``: eager, or through ``torch.compile`` (inductor; on a CPU its C++
    backend, which fuses each body's ~40 elementwise operations into a handful of loops around the matrix products:
    measured 1.5x the meta-training throughput of the eager bodies on a 2-core AMD EPYC). Compiled once per process
    and shape family (``dynamic=None``: a second shape recompiles with dynamic sizes); inductor caches the code on
    disk. Where compilation fails (no working C++ compiler), a warning names the error and the eager bodies run."""
    eager = _EAGER[cell]
    if not compiled or COMPILE_FAILED:
        return eager
    if cell not in _COMPILED:
        _COMPILED[cell] = tuple(compile_with_fallback(torch.compile(fn, fullgraph=True, dynamic=None), fn) for fn in eager)
    return _COMPILED[cell]
