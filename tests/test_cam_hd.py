"""CAM-HD (metaopt.hypergrad.cam_hd) against the oracles C-1…C-8 of specs/hypergradient.md §6, the global HD
optimizers, torch.optim, closed forms, independent loop references for the level groupings and finite differences."""

import contextlib
import copy
import math

import pytest
import torch
from helpers import assert_nonfinite_step_is_skipped, assert_same_parameters_and_state
from torch import nn

import metaopt
import metaopt.hypergrad.cam_hd  # noqa: F401  (registers cam-hd-*)
import metaopt.hypergrad.hd  # noqa: F401  (registers sgd-hd, sgdn-hd, adam-hd)
from metaopt.hypergrad.cam_hd import (
    LEVELS,
    CamHDRule,
    ParamLayout,
    combine_levels,
    level_hypergradients,
    level_rates,
    update_gamma,
)

F64 = torch.float64
ALL_LEVELS = LEVELS  # ("parameter", "unit", "layer", "global")

# (cam-hd name, its HD counterpart, torch class, base kwargs shared by all three)
BASES = [
    ("cam-hd-sgd", "sgd-hd", torch.optim.SGD, {}, {}),
    ("cam-hd-sgdn", "sgdn-hd", torch.optim.SGD, dict(momentum=0.9), dict(momentum=0.9, nesterov=True)),
    ("cam-hd-adam", "adam-hd", torch.optim.Adam, {}, {}),
]
BASE_IDS = [b[0] for b in BASES]


# ----------------------------------------------------------------------------------------------------------------------
# Harness: separable quadratics f = ½ Σ a_i x_i² split over named tensors, with exact gradients a ⊙ x


def quadratic(split, dtype=F64):
    """``split``: {name: (a values, x0 values, shape)} -> (named params, curvature per name)."""
    params, curv = [], {}
    for name, (a, x0, shape) in split.items():
        params.append((name, torch.tensor(x0, dtype=dtype).reshape(shape).requires_grad_()))
        curv[name] = torch.tensor(a, dtype=dtype).reshape(shape)
    return params, curv


def quad_step(opt, params, curv):
    for name, p in params:
        p.grad = curv[name] * p.detach()
    opt.step()


# spec C-1 / C-2 problem: A = diag(2, .5, 1, 3), x0 = (1, −1, .5, 2), layers {0, 1} and {2, 3}
C1_SPLIT = {"l0.weight": ([2.0, 0.5], [1.0, -1.0], (2,)), "l1.weight": ([1.0, 3.0], [0.5, 2.0], (2,))}


def mlp(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def cnn(dtype=F64, seed=0):
    """Conv(1→4, 3×3) + BatchNorm(4) + ReLU + Conv(4→3, 2×2, no bias) + Flatten + Linear(3·3·3 → 5), input 1×6×6."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 2, bias=False),
                         nn.Flatten(), nn.Linear(27, 5)).to(dtype)


def train(model, opt, steps, seed=1, in_shape=(3,)):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(8, *in_shape, generator=gen).to(dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def concat_state(opt, field):
    return torch.cat([opt.state[p][field].reshape(-1) for g in opt.param_groups for p in g["params"]])


# ----------------------------------------------------------------------------------------------------------------------
# C-1: γ = (0, …, 0, 1), δ = 0 collapses to the global HD optimizer, exactly


C1_CONFIGS = [
    ("3-level renorm", dict(gamma=(0.0, 0.0, 1.0))),
    ("3-level softmax, logits (-inf, -inf, 0)", dict(gamma=(0.0, 0.0, 1.0), gamma_mode="softmax")),
    ("softmax, delta > 0 (zero weights stay zero)", dict(gamma=(0.0, 0.0, 1.0), gamma_mode="softmax", gamma_lr=0.1)),
    ("2-level layer+global", dict(levels=("layer", "global"), gamma=(0.0, 1.0))),
    ("2-level filter+global", dict(levels=("filter", "global"), gamma=(0.0, 1.0))),
    ("4-level, per-level beta", dict(levels=ALL_LEVELS, gamma=(0.0, 0.0, 0.0, 1.0),
                                     hypergrad_lr=(3.0, 2.0, 1.0, 0.01))),
]


@pytest.mark.parametrize("config_id,config", C1_CONFIGS, ids=[c[0] for c in C1_CONFIGS])
@pytest.mark.parametrize("name,hd_name,_torch_cls,kw,_torch_kw", BASES, ids=BASE_IDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_C1_collapses_to_global_hd_exactly(name, hd_name, _torch_cls, kw, _torch_kw, config_id, config, weight_decay):
    ours, curv = quadratic(C1_SPLIT)
    ref, _ = quadratic(C1_SPLIT)
    opt = metaopt.make_optimizer(name, ours, lr=0.1, weight_decay=weight_decay, **{
        "hypergrad_lr": 0.01, "gamma_lr": 0.0, **config})
    ref_opt = metaopt.make_optimizer(hd_name, ref, lr=0.1, hypergrad_lr=0.01, weight_decay=weight_decay)
    for _ in range(5):
        quad_step(opt, ours, curv)
        quad_step(ref_opt, ref, curv)
        assert opt.param_groups[0]["alpha_global"] == ref_opt.param_groups[0]["lr"]
        for (_, p), (_, q) in zip(ours, ref):
            assert torch.equal(p, q), f"max |Δθ| = {(p - q).abs().max().item()}"
    assert ref_opt.param_groups[0]["lr"] != 0.1  # the global rate did adapt
    assert opt.param_groups[0]["gamma"] == list(config["gamma"])


@pytest.mark.parametrize("name,hd_name", [("cam-hd-sgd", "sgd-hd"), ("cam-hd-sgdn", "sgdn-hd")])
def test_C1_float32_mlp_sgd_bases_bit_exact(name, hd_name):
    """Also on a float32 MLP trained by autograd (the parameter level's per-element rate is applied with one fused
    multiply-add, as torch's ``add(alpha=-lr)``)."""
    ours, ref = mlp(torch.float32), mlp(torch.float32)
    opt = metaopt.make_optimizer(name, ours.named_parameters(), lr=0.01, hypergrad_lr=0.01, gamma=(0.0, 0.0, 1.0),
                                 gamma_lr=0.0)
    assert all(torch.equal(a, torch.full_like(a, 0.01)) for a in opt.combined_lr().values())  # α*_0 = α_0
    train(ours, opt, 10)
    train(ref, metaopt.make_optimizer(hd_name, ref.parameters(), lr=0.01, hypergrad_lr=0.01), 10)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------------------------------
# C-2: γ = (1, 0, 0): every coordinate runs its own P1-type HD


def test_C2_parameter_level_closed_form():
    params, curv = quadratic(C1_SPLIT)
    opt = metaopt.make_optimizer("cam-hd-sgd", params, lr=0.1, hypergrad_lr=0.01, gamma=(1.0, 0.0, 0.0),
                                 gamma_lr=0.0)
    a, x0 = torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=F64), torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=F64)
    quad_step(opt, params, curv)
    quad_step(opt, params, curv)
    alpha2 = concat_state(opt, "alpha_param")
    closed = 0.1 + 0.01 * a**2 * x0**2 * (1 - 0.1 * a)
    torch.testing.assert_close(closed, torch.tensor([0.132, 0.102375, 0.10225, 0.352], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(alpha2, closed, rtol=1e-15, atol=0)
    x2 = x0 * (1 - 0.1 * a) * (1 - closed * a)
    torch.testing.assert_close(torch.cat([p.detach() for _, p in params]), x2, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name,hd_name,_torch_cls,kw,_torch_kw", BASES, ids=BASE_IDS)
def test_C2_parameter_level_equals_per_coordinate_hd(name, hd_name, _torch_cls, kw, _torch_kw):
    """Each coordinate, with its own α_p, is exactly a one-coordinate global HD run."""
    params, curv = quadratic(C1_SPLIT)
    opt = metaopt.make_optimizer(name, params, lr=0.1, hypergrad_lr=0.01, gamma=(1.0, 0.0, 0.0), gamma_lr=0.0)
    coords = {}
    for n, (a, x0, _) in C1_SPLIT.items():
        for i in range(2):
            p, c = quadratic({f"{n}{i}": ([a[i]], [x0[i]], (1,))})
            coords[(n, i)] = (p, c, metaopt.make_optimizer(hd_name, p, lr=0.1, hypergrad_lr=0.01))
    for _ in range(5):
        quad_step(opt, params, curv)
        for p, c, o in coords.values():
            quad_step(o, p, c)
    for n, p in params:
        for i in range(2):
            ref_p, _, ref_opt = coords[(n, i)]
            assert torch.equal(p[i:i + 1], ref_p[0][1])
            assert opt.state[p]["alpha_param"][i].item() == ref_opt.param_groups[0]["lr"]


# ----------------------------------------------------------------------------------------------------------------------
# C-3: γ_l = 1: every layer is an independent global HD on its block

C3_SPLIT = {"l0.weight": ([2.0, 0.5], [1.0, -1.0], (2, 1)), "l0.bias": ([1.5, 0.7], [0.3, 0.8], (2,)),
            "l1.weight": ([1.0, 3.0], [0.5, 2.0], (1, 2)), "l1.bias": ([2.5], [-0.6], (1,))}


@pytest.mark.parametrize("hypergrad_lr", [0.01, (0.5, 0.01, 0.7)], ids=["common beta", "per-level beta"])
@pytest.mark.parametrize("name,hd_name,_torch_cls,kw,_torch_kw", BASES, ids=BASE_IDS)
def test_C3_layer_level_is_independent_hd_per_layer(name, hd_name, _torch_cls, kw, _torch_kw, hypergrad_lr):
    params, curv = quadratic(C3_SPLIT)
    opt = metaopt.make_optimizer(name, params, lr=0.1, hypergrad_lr=hypergrad_lr, gamma=(0.0, 1.0, 0.0),
                                 gamma_lr=0.0)
    blocks = []
    for layer in ("l0", "l1"):
        p, c = quadratic({k: v for k, v in C3_SPLIT.items() if k.startswith(layer + ".")})
        blocks.append((p, c, metaopt.make_optimizer(hd_name, p, lr=0.1, hypergrad_lr=0.01)))
    for _ in range(5):
        quad_step(opt, params, curv)
        for p, c, o in blocks:
            quad_step(o, p, c)
    assert opt.param_groups[0]["alpha_layer"] == [o.param_groups[0]["lr"] for _, _, o in blocks]
    ref = dict(blocks[0][0] + blocks[1][0])
    for n, p in params:
        assert torch.equal(p, ref[n])


# ----------------------------------------------------------------------------------------------------------------------
# C-4: scalar model, fixed γ: α* is SGD-HD with β_eff = β·‖γ‖²


def test_C4_scalar_model_follows_hd_with_effective_beta():
    p1 = {"w": ([2.0], [1.0], ())}
    params, curv = quadratic(p1)
    opt = metaopt.make_optimizer("cam-hd-sgd", params, lr=0.1, hypergrad_lr=0.01, gamma=(0.2, 0.3, 0.5),
                                 gamma_lr=0.0)
    ref, _ = quadratic(p1)
    ref_opt = metaopt.make_optimizer("sgd-hd", ref, lr=0.1, hypergrad_lr=0.01 * (0.2**2 + 0.3**2 + 0.5**2))
    expected = [0.1, 0.11216, 0.11970581504, 0.124157643586, 0.126702854802]
    for t in range(5):
        x_prev = params[0][1].item()
        quad_step(opt, params, curv)
        quad_step(ref_opt, ref, curv)
        alpha_star = opt.combined_lr()["w"].item()
        assert alpha_star == pytest.approx(expected[t], rel=0, abs=5e-13)
        assert alpha_star == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-14)
        assert params[0][1].item() == pytest.approx(x_prev * (1 - 2.0 * alpha_star), rel=1e-14)  # the applied α*


# ----------------------------------------------------------------------------------------------------------------------
# Independent references for the groupings (plain loops over modules, rows and elements)


def reference_groups(model):
    """Per element of the flattened named parameters: its unit id and layer id, by looping over the modules."""
    unit_of, layer_of, next_unit = {}, {}, 0
    for layer_id, (mod_name, module) in enumerate((n, m) for n, m in model.named_modules()
                                                   if list(m.parameters(recurse=False))):
        own = dict(module.named_parameters(recurse=False))
        w, b = own.get("weight"), own.get("bias")
        rows = w.shape[0]
        for leaf, p in own.items():
            name = f"{mod_name}.{leaf}"
            layer_of[name] = torch.full(p.shape, layer_id)
            unit = torch.arange(next_unit, next_unit + rows).reshape((rows,) + (1,) * (p.dim() - 1))
            unit_of[name] = unit.expand(p.shape).clone()
        next_unit += rows
        assert b is None or b.shape == (rows,)
    return unit_of, layer_of, next_unit


@pytest.mark.parametrize("make,n_layers,n_units", [(mlp, 2, 4 + 2), (cnn, 4, 4 + 4 + 3 + 5)], ids=["mlp", "cnn"])
def test_groupings_from_named_parameters(make, n_layers, n_units):
    model = make()
    named = dict(model.named_parameters())
    layout = ParamLayout.from_params(named)
    assert (layout.num_layers, layout.num_units, layout.numel) == (n_layers, n_units,
                                                                  sum(p.numel() for p in named.values()))
    unit_of, layer_of, ref_units = reference_groups(model)
    assert ref_units == n_units
    sizes = layout.indices("cpu")
    ref_unit_size = torch.zeros(n_units, dtype=F64)
    ref_layer_size = torch.zeros(n_layers, dtype=F64)
    for n in named:
        ref_unit_size += torch.bincount(unit_of[n].reshape(-1), minlength=n_units).to(F64)
        ref_layer_size += torch.bincount(layer_of[n].reshape(-1), minlength=n_layers).to(F64)
    assert torch.equal(sizes["unit_size"], ref_unit_size)
    assert torch.equal(sizes["layer_size"], ref_layer_size)
    if make is cnn:  # a filter: 1·3·3 weights + its bias; a BatchNorm channel: scale + shift; no-bias conv: 4·2·2
        assert ref_unit_size.tolist() == [10.0] * 4 + [2.0] * 4 + [16.0] * 3 + [28.0] * 5

    # The segment sums equal the loop reference for every level, and the levels nest (C-6).
    gen = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in named.items()}
    dirs = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in named.items()}
    h = level_hypergradients(layout, ALL_LEVELS, grads, dirs, tau=0.5)
    ref_u = torch.zeros(n_units, dtype=F64)
    ref_l = torch.zeros(n_layers, dtype=F64)
    for n in named:
        e = -0.5 * grads[n] * dirs[n]
        torch.testing.assert_close(h["parameter"][n], e, rtol=0, atol=0)
        for j in range(n_units):
            ref_u[j] += e[unit_of[n] == j].sum()
        for j in range(n_layers):
            ref_l[j] += e[layer_of[n] == j].sum()
    torch.testing.assert_close(h["unit"], ref_u, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(h["layer"], ref_l, rtol=1e-13, atol=1e-15)


def test_unnamed_parameters_make_one_layer_per_tensor():
    model = cnn()
    opt = metaopt.make_optimizer("cam-hd-sgd", model.parameters(), levels=ALL_LEVELS)
    layout = opt.layout(opt.param_groups[0])
    n_tensors = len(list(model.parameters()))
    assert layout.num_layers == n_tensors
    assert layout.num_units == sum(p.shape[0] for p in model.parameters())  # biases are not merged without names
    train(model, opt, 2, in_shape=(1, 6, 6))
    assert len(opt.param_groups[0]["alpha_layer"]) == n_tensors
    named = metaopt.make_optimizer("cam-hd-sgd", model.named_parameters(), levels=ALL_LEVELS)
    assert named.layout(named.param_groups[0]).num_layers == 4


def test_bias_matching_rules():
    layout = ParamLayout(["lstm.weight_ih_l0", "lstm.bias_ih_l0", "lstm.bias_hh_l0", "scale", "head.bias", "b.bias"],
                         [(8, 3), (8,), (8,), (5,), (4,), ()])
    assert layout.shared_bias == {1: 0}       # bias_ih ↔ weight_ih; bias_hh has no weight_hh here
    assert layout.unit_offset == (0, 0, 8, 16, 21, 25)
    assert layout.num_units == 26             # lone 1-D tensors: one unit per element; a 0-d tensor: one unit
    assert layout.layer_keys == ("lstm", "", "head", "b")


# ----------------------------------------------------------------------------------------------------------------------
# C-5: α0 = 0 at every level, δ = 0: α*_2[p] = β·Σ_k γ_k²·S_k[π_k(p)]


@pytest.mark.parametrize("name,scale", [("cam-hd-sgd", "g2"), ("cam-hd-sgdn", "g2 (1+mu)"), ("cam-hd-adam", "|g|")])
def test_C5_zero_initial_rates(name, scale):
    model = mlp()
    gamma = (0.1, 0.2, 0.3, 0.4)
    beta = 0.5 if name != "cam-hd-adam" else 0.01
    kw = dict(eps=0.0) if name == "cam-hd-adam" else {}
    opt = metaopt.make_optimizer(name, model.named_parameters(), lr=0.0, hypergrad_lr=beta, levels=ALL_LEVELS,
                                 gamma=gamma, gamma_lr=0.0, **kw)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    theta0 = [p.detach().clone() for p in model.parameters()]
    grads1 = None
    for step in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if step == 0:
            grads1 = {n: p.grad.clone() for n, p in model.named_parameters()}
        else:
            assert all(torch.equal(p.grad, grads1[n]) for n, p in model.named_parameters())  # θ_1 = θ_0
        opt.step()
        if step == 0:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta0))
    e = {n: g * g if scale != "|g|" else g.abs() for n, g in grads1.items()}
    if scale == "g2 (1+mu)":
        e = {n: v * 1.9 for n, v in e.items()}
    unit_of, layer_of, n_units = reference_groups(model)
    s_unit = torch.zeros(n_units, dtype=F64)
    s_layer = torch.zeros(2, dtype=F64)
    for n in e:
        s_unit.index_add_(0, unit_of[n].reshape(-1), e[n].reshape(-1))
        s_layer.index_add_(0, layer_of[n].reshape(-1), e[n].reshape(-1))
    s_global = sum(v.sum() for v in e.values())
    combined = opt.combined_lr()
    for n in e:
        expected = beta * (gamma[0] ** 2 * e[n] + gamma[1] ** 2 * s_unit[unit_of[n]]
                           + gamma[2] ** 2 * s_layer[layer_of[n]] + gamma[3] ** 2 * s_global)
        torch.testing.assert_close(combined[n].expand_as(expected), expected, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# C-6: invariants


def test_C6_renorm_keeps_gamma_summing_to_one():
    model = mlp()
    opt = metaopt.make_optimizer("cam-hd-sgd", model.named_parameters(), lr=0.05, hypergrad_lr=0.05,
                                 gamma=(0.3, 0.3, 0.4), gamma_lr=0.1)
    history = []
    for seed in range(8):
        train(model, opt, 1, seed=seed)
        gamma = opt.param_groups[0]["gamma"]
        history.append(gamma)
        assert abs(math.fsum(gamma) - 1.0) <= 4e-16
        assert all(g >= 0 for g in gamma)
    assert history[-1] != [0.3, 0.3, 0.4]


def test_C6_softmax_keeps_gamma_positive_where_renorm_clamps():
    model = mlp()
    opt = metaopt.make_optimizer("cam-hd-sgd", model.named_parameters(), lr=0.05, hypergrad_lr=0.05, gamma_lr=2e3,
                                 gamma_mode="softmax")
    for seed in range(6):
        train(model, opt, 1, seed=seed)
        gamma = opt.param_groups[0]["gamma"]
        assert abs(math.fsum(gamma) - 1.0) <= 1e-15 and all(g > 0 for g in gamma)
    # Two core steps that overshoot (α·a > 1, so h > 0 and ∂L/∂γ > 0) from level rates that differ (so ∂L/∂γ differs
    # per level), with a δ that overshoots γ_p: renorm clamps a weight to exactly 0, softmax keeps every weight
    # positive.
    start, curv = _hook_problem()
    gammas = {}
    for mode in ("renorm", "softmax"):
        rule = CamHDRule("sgd", lr=0.05, hypergrad_lr=0.01, gamma_lr=1e-3, gamma_mode=mode)
        params, state = start, rule.init(start)
        state = state._replace(alpha_param={n: torch.full_like(p, 0.2) for n, p in params.items()},
                               alpha_layer=torch.tensor([0.05, 0.01], dtype=F64))
        for _ in range(2):
            params, state = rule.step(params, {n: 20 * curv[n] * p for n, p in params.items()}, state)
        gammas[mode] = state.gamma
        assert abs(math.fsum(state.gamma.tolist()) - 1.0) <= 1e-15
    assert gammas["renorm"].min() == 0.0 and gammas["renorm"].max() < 1.0
    assert gammas["softmax"].min() > 0.0


@pytest.mark.parametrize("mode", ["renorm", "softmax"])
def test_C6_zero_gamma_lr_keeps_gamma_exactly(mode):
    model = mlp()
    gamma = (0.1, 0.2, 0.7)
    opt = metaopt.make_optimizer("cam-hd-adam", model.named_parameters(), lr=0.01, hypergrad_lr=1e-3, gamma=gamma,
                                 gamma_lr=0.0, gamma_mode=mode)
    train(model, opt, 4)
    assert opt.param_groups[0]["gamma"] == list(gamma)
    assert any(g != 0 for g in opt.param_groups[0]["gamma_grad"])


def test_C6_level_hypergradients_nest():
    model = cnn()
    named = dict(model.named_parameters())
    layout = ParamLayout.from_params(named)
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in named.items()}
    dirs = {n: torch.randn(p.shape, generator=gen, dtype=F64) for n, p in named.items()}
    h = level_hypergradients(layout, ALL_LEVELS, grads, dirs)
    h_p = sum(v.sum() for v in h["parameter"].values())
    for total in (h["unit"].sum(), h["layer"].sum(), h_p):
        torch.testing.assert_close(total, h["global"], rtol=1e-13, atol=1e-14)
    # h^{(g)} is the global HD hypergradient bit for bit (same float64 dot products, same order)
    from metaopt.hypergrad.hd import global_hypergradient
    assert torch.equal(h["global"], global_hypergradient(grads, dirs))


def test_C6_update_gamma_rules():
    gamma = torch.tensor([0.3, 0.3, 0.4], dtype=F64)
    renorm = update_gamma(gamma, torch.tensor([1.0, -1.0, 0.0], dtype=F64), 0.1)
    torch.testing.assert_close(renorm, torch.tensor([0.2, 0.4, 0.4], dtype=F64), rtol=0, atol=1e-16)
    clamped = update_gamma(gamma, torch.tensor([5.0, 0.0, 0.0], dtype=F64), 0.1)  # γ' = (−0.2, 0.3, 0.4)
    torch.testing.assert_close(clamped, torch.tensor([0.0, 0.3 / 0.7, 0.4 / 0.7], dtype=F64), rtol=1e-15, atol=0)
    kept = update_gamma(gamma, torch.tensor([10.0, 10.0, 10.0], dtype=F64), 0.1)  # all clamp: keep γ_{t−1}
    assert torch.equal(kept, gamma)
    grad = torch.tensor([0.7, -0.2, 1.3], dtype=F64)
    logits = torch.log(gamma) + 1.234  # softmax mode on logits (any shift)
    jac = torch.diag(gamma) - torch.outer(gamma, gamma)  # ∂γ/∂c
    expected = torch.softmax(logits - 0.5 * jac @ grad, dim=0)
    torch.testing.assert_close(update_gamma(gamma, grad, 0.5, "softmax"), expected, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# C-7: the τ schedule


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("name,_hd,torch_cls,kw,torch_kw", BASES, ids=BASE_IDS)
def test_C7_tau_zero_is_the_torch_optimizer_at_alpha_inf(name, _hd, torch_cls, kw, torch_kw, dtype):
    ours, ref = mlp(dtype), mlp(dtype)
    opt = metaopt.make_optimizer(name, ours.named_parameters(), lr=0.1, hypergrad_lr=0.01, decay=math.inf,
                                 alpha_inf=0.03, weight_decay=0.01, levels=ALL_LEVELS, gamma_lr=0.1, **kw)
    ref_opt = torch_cls(ref.parameters(), lr=0.03, weight_decay=0.01, foreach=False, **torch_kw)
    train(ours, opt, 8)
    train(ref, ref_opt, 8)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q), f"max |Δθ| = {(p - q).abs().max().item()}"


@pytest.mark.parametrize("name", BASE_IDS)
def test_C7_zero_decay_is_no_decay(name):
    runs = []
    for extra in ({}, dict(decay=0.0, alpha_inf=123.0)):
        model = mlp()
        opt = metaopt.make_optimizer(name, model.named_parameters(), lr=0.02, hypergrad_lr=0.01, **extra)
        train(model, opt, 6)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        assert torch.equal(p, q)


def test_C7_tau_schedule_closed_form():
    """Global level only on P1 with s = 0.3: κ_t = τ_t·α_t + (1−τ_t)·α_∞, and h is scaled by τ_{t−1}."""
    a, x0, lr, beta, s, alpha_inf = 2.0, 1.0, 0.1, 0.01, 0.3, 0.05
    params, curv = quadratic({"w": ([a], [x0], (1,))})
    opt = metaopt.make_optimizer("cam-hd-sgd", params, lr=lr, hypergrad_lr=beta, levels=("global",), gamma=(1.0,),
                                 decay=s, alpha_inf=alpha_inf)
    tau1, tau2 = math.exp(-s), math.exp(-2 * s)
    kappa1 = tau1 * lr + (1 - tau1) * alpha_inf
    x1 = x0 - kappa1 * a * x0
    alpha2 = lr + beta * tau1 * (a * x1) * (a * x0)
    kappa2 = tau2 * alpha2 + (1 - tau2) * alpha_inf
    x2 = x1 - kappa2 * a * x1
    quad_step(opt, params, curv)
    assert params[0][1].item() == pytest.approx(x1, rel=1e-15)
    quad_step(opt, params, curv)
    assert opt.param_groups[0]["alpha_global"] == pytest.approx(alpha2, rel=1e-15)
    assert params[0][1].item() == pytest.approx(x2, rel=1e-14)


# ----------------------------------------------------------------------------------------------------------------------
# C-8: the β reductions agree with explicitly scaled per-group β


def _cnn_problem():
    model = cnn()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    curv = {n: torch.rand(p.shape, generator=gen, dtype=F64) + 0.5 for n, p in params.items()}
    return model, params, curv


def _unroll(rule, params, curv, steps=5):
    state = rule.init(params)
    for _ in range(steps):
        grads = {n: curv[n] * p + p**3 for n, p in params.items()}
        params, state = rule.step(params, grads, state)
    return params, state


@pytest.mark.parametrize("reduction", ["mean", "paper_eq35"])
def test_C8_beta_reductions_equal_scaled_sum(reduction):
    model, params, curv = _cnn_problem()
    unit_of, layer_of, n_units = reference_groups(model)
    unit_size = torch.zeros(n_units, dtype=F64)
    layer_size = torch.zeros(4, dtype=F64)
    for n in params:
        unit_size += torch.bincount(unit_of[n].reshape(-1), minlength=n_units).to(F64)
        layer_size += torch.bincount(layer_of[n].reshape(-1), minlength=4).to(F64)
    n_total = float(sum(p.numel() for p in params.values()))
    beta = 0.02 if reduction == "mean" else 2e-5
    if reduction == "mean":
        scaled = (beta, beta / unit_size, beta / layer_size, beta / n_total)
    else:
        scaled = (beta, beta * unit_size, beta * layer_size, beta * n_total)
    common = dict(base="sgd", lr=0.01, levels=ALL_LEVELS, gamma_lr=0.05, momentum=0.9)
    ours, state = _unroll(CamHDRule(hypergrad_lr=beta, beta_reduction=reduction, **common), params, curv)
    ref, ref_state = _unroll(CamHDRule(hypergrad_lr=scaled, beta_reduction="sum", **common), params, curv)
    for n in params:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-12, atol=1e-15)
    for field in ("gamma", "alpha_unit", "alpha_layer", "alpha_global"):
        torch.testing.assert_close(getattr(state, field), getattr(ref_state, field), rtol=1e-12, atol=1e-15)
    assert not torch.equal(state.alpha_layer, torch.full_like(state.alpha_layer, 0.01))  # the rates did move


# ----------------------------------------------------------------------------------------------------------------------
# The learned-γ hook: the core is differentiable in a tensor γ (float64 finite differences)


def _hook_problem():
    gen = torch.Generator().manual_seed(11)
    shapes = {"l0.weight": (3, 2), "l0.bias": (3,), "l1.weight": (2, 3), "l1.bias": (2,)}
    params = {n: 0.6 * torch.randn(s, generator=gen, dtype=F64) for n, s in shapes.items()}
    curv = {n: torch.rand(s, generator=gen, dtype=F64) + 0.5 for n, s in shapes.items()}
    return params, curv


def _meta_loss(gamma, base, mode, override):
    params, curv = _hook_problem()
    rule = CamHDRule(base, lr=0.05, hypergrad_lr=0.5 if base == "sgd" else 1e-3, levels=ALL_LEVELS,
                     gamma_lr=0.2, gamma_mode=mode, momentum=0.9, decay=0.05)
    state = rule.init(params)
    if not override:
        state = state._replace(gamma=gamma)
    for t in range(4):
        grads = {n: curv[n] * p + p**3 for n, p in params.items()}
        # a per-step γ from outside, as a learned rule would produce it
        params, state = rule.step(params, grads, state, gamma=gamma * (1 + 0.1 * t) if override else None)
    return sum((0.5 * curv[n] * p**2 + 0.25 * p**4).sum() for n, p in params.items())


@pytest.mark.parametrize("base,mode,override", [("sgd", "renorm", True), ("adam", "renorm", True),
                                                ("sgd", "renorm", False), ("sgd", "softmax", False),
                                                ("adam", "softmax", False)])
def test_core_is_differentiable_in_tensor_gamma(base, mode, override):
    gamma = torch.tensor([0.2, 0.3, 0.1, 0.4], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(_meta_loss(gamma, base, mode, override), gamma)
    eps = 1e-6
    fd = torch.zeros(4, dtype=F64)
    with torch.no_grad():
        for k in range(4):
            bump = torch.zeros(4, dtype=F64)
            bump[k] = eps
            fd[k] = (_meta_loss(gamma + bump, base, mode, override)
                     - _meta_loss(gamma - bump, base, mode, override)) / (2 * eps)
    assert grad.abs().max() > 1e-4
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_gamma_override_replaces_the_delta_rule():
    params, curv = _hook_problem()
    rule = CamHDRule("sgd", lr=0.05, hypergrad_lr=0.5, levels=ALL_LEVELS, gamma_lr=0.2, momentum=0.9)
    state = rule.init(params)
    override = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    for _ in range(3):
        grads = {n: curv[n] * p for n, p in params.items()}
        new, state_o = rule.step(params, grads, state, gamma=override)
        # the same step with the override placed in the state and δ = 0 is identical
        frozen = CamHDRule("sgd", lr=0.05, hypergrad_lr=0.5, levels=ALL_LEVELS, gamma_lr=0.0, momentum=0.9)
        new_f, state_f = frozen.step(params, grads, state._replace(gamma=override))
        assert all(torch.equal(new[n], new_f[n]) for n in params)
        assert torch.equal(state_o.gamma, override) and torch.equal(state_o.gamma_grad, state_f.gamma_grad)
        applied = combine_levels(rule.layout, rule.levels, override, level_rates(state_o, rule.levels), params)
        for n in params:  # θ_t = θ_{t−1} − α* ⊙ d_t with the override's α*
            torch.testing.assert_close(new[n], params[n] - applied[n] * state_o.prev_direction[n], rtol=1e-15,
                                       atol=1e-16)
        params, state = new, state_o
    with pytest.raises(ValueError, match="gamma"):
        rule.step(params, grads, state, gamma=torch.ones(3, dtype=F64) / 3)


# ----------------------------------------------------------------------------------------------------------------------
# The face: resume, non-finite, missing gradients, negative rates, bad input


@pytest.mark.parametrize("name,extra", [("cam-hd-sgd", {}), ("cam-hd-sgdn", dict(gamma_mode="softmax")),
                                        ("cam-hd-adam", dict(hypergrad_lr=1e-3))])
def test_state_dict_resume_is_bit_exact(name, extra):
    kw = dict(lr=0.01, levels=ALL_LEVELS, gamma_lr=0.1, decay=0.01, **extra)
    straight = mlp(torch.float32)
    opt = metaopt.make_optimizer(name, straight.named_parameters(), **kw)
    train(straight, opt, 5, seed=1)
    train(straight, opt, 5, seed=2)

    resumed = mlp(torch.float32)
    opt1 = metaopt.make_optimizer(name, resumed.named_parameters(), **kw)
    train(resumed, opt1, 5, seed=1)
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = metaopt.make_optimizer(name, resumed.named_parameters(), **kw)
    opt2.load_state_dict(saved)
    train(resumed, opt2, 5, seed=2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for key in ("gamma", "gamma_grad", "alpha_unit", "alpha_layer", "alpha_global", "step"):
        assert opt.param_groups[0][key] == opt2.param_groups[0][key]
    assert torch.equal(concat_state(opt, "alpha_param"), concat_state(opt2, "alpha_param"))


IN_PLACE = [
    ("cam-hd-adam", {}),
    ("cam-hd-adam", dict(levels=ALL_LEVELS, hypergrad_lr=1e-3, gamma_mode="softmax", weight_decay=1e-2, eps=1e-6)),
    ("cam-hd-adam", dict(levels=("unit", "global"), hypergrad_lr=(1e-2, 1e-3), beta_reduction="mean",
                         clip_lr_at_zero=True, decay=0.05)),
    ("cam-hd-adam", dict(levels=("layer", "global"), hypergrad_lr=1e-2, decay=math.inf)),
    ("cam-hd-sgd", dict(levels=ALL_LEVELS, weight_decay=1e-3, beta_reduction="paper_eq35", hypergrad_lr=1e-5)),
    ("cam-hd-sgd", dict(decay=math.inf)),
    ("cam-hd-sgdn", dict(levels=("parameter", "global"), clip_lr_at_zero=True, hypergrad_lr=0.5)),
    ("cam-hd-sgdn", dict(levels=ALL_LEVELS, nesterov=False, gamma_lr=0.0, decay=0.01)),
]
IN_PLACE_IDS = ["adam-default", "adam-all-softmax-decay", "adam-unit-mean-clip-tau", "adam-tau-zero",
                "sgd-eq35-wd", "sgd-tau-zero", "sgdn-clip", "heavy-ball-fixed-gamma"]


@pytest.mark.parametrize("name,kw", IN_PLACE, ids=IN_PLACE_IDS)
def test_in_place_face_equals_the_rule_and_resumes_its_state(name, kw):
    """fast=True (the default) applies the rule's rates in place; fast=False steps through CamHDRule and copies. Same
    bits for the parameters, every level's rates, γ and the base optimizer's state, and each resumes the other's
    state_dict (float32, a CNN with units, layers and a bias-free conv)."""
    kw = dict(lr=0.02, gamma_lr=0.1, **kw) if "gamma_lr" not in kw else dict(lr=0.02, **kw)
    fast, slow = cnn(torch.float32), cnn(torch.float32)
    fast_opt = metaopt.make_optimizer(name, fast.named_parameters(), **kw)
    slow_opt = metaopt.make_optimizer(name, slow.named_parameters(), fast=False, **kw)
    train(fast, fast_opt, 6, in_shape=(1, 6, 6))
    train(slow, slow_opt, 6, in_shape=(1, 6, 6))
    a, b = assert_same_parameters_and_state(fast, fast_opt, slow, slow_opt)
    assert a["param_groups"][0]["step"] == 6
    fast_opt.load_state_dict(b)
    slow_opt.load_state_dict(a)
    train(fast, fast_opt, 4, seed=2, in_shape=(1, 6, 6))
    train(slow, slow_opt, 4, seed=2, in_shape=(1, 6, 6))
    assert_same_parameters_and_state(fast, fast_opt, slow, slow_opt)


@pytest.mark.parametrize("name", BASE_IDS)
def test_in_place_face_screens_later_nonfinite_gradients_through_gamma_grad(name):
    """From the second step on, the in-place step sees a NaN / inf gradient in ∂L/∂γ (no separate pass) and skips,
    or raises, writing nothing; an inf in the last tensor is caught as well as a NaN in the first."""
    model = mlp(torch.float32)
    opt = metaopt.make_optimizer(name, model.named_parameters(), levels=ALL_LEVELS)
    train(model, opt, 3)
    state_before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    for skipped, bad in enumerate((float("inf"), -float("inf"), float("nan")), start=1):
        list(model.parameters())[-1].grad.view(-1)[-1] = bad
        with pytest.warns(RuntimeWarning, match="non-finite gradient") if skipped == 1 else contextlib.nullcontext():
            opt.step()
        assert opt.param_groups[0]["nonfinite_skipped"] == skipped
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i][k], v) for i, st in state_before["state"].items() for k, v in st.items())
    for key in ("gamma", "gamma_grad", "alpha_unit", "alpha_layer", "alpha_global", "step"):
        assert after["param_groups"][0][key] == state_before["param_groups"][0][key]
    raising = metaopt.make_optimizer(name, model.named_parameters(), levels=ALL_LEVELS, nonfinite="raise")
    raising.load_state_dict(opt.state_dict())
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        raising.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


COMPILED = [
    ("cam-hd-adam", dict(levels=ALL_LEVELS, hypergrad_lr=1e-3, gamma_mode="softmax", weight_decay=1e-2, decay=0.05)),
    ("cam-hd-sgdn", dict(levels=("parameter", "unit", "global"), nesterov=False, clip_lr_at_zero=True,
                         hypergrad_lr=50.0)),  # rates cross zero on three of the steps
    ("cam-hd-sgd", dict(levels=("unit", "layer", "global"), beta_reduction="mean", weight_decay=1e-3,
                        hypergrad_lr=1.0)),
]


@pytest.mark.parametrize("name,kw", COMPILED, ids=["adam-all-levels", "heavy-ball-clip", "sgd-mean"])
def test_compiled_face_equals_the_rule_within_float32_rounding(name, kw):
    """compile=True fuses the reductions and the update (torch.compile, inductor) after the first step: the rule's
    trajectory within float32 rounding (rates, γ, negative-rate count and parameters), the rule's state layout (each
    resumes the other), and non-finite gradients still screened through ∂L/∂γ with nothing written."""
    kw = dict(lr=0.02, gamma_lr=0.1, **kw)
    fast, slow = cnn(torch.float32), cnn(torch.float32)
    fast_opt = metaopt.make_optimizer(name, fast.named_parameters(), compile=True, **kw)
    slow_opt = metaopt.make_optimizer(name, slow.named_parameters(), fast=False, **kw)
    train(fast, fast_opt, 6, in_shape=(1, 6, 6))
    train(slow, slow_opt, 6, in_shape=(1, 6, 6))
    a, b = fast_opt.state_dict(), slow_opt.state_dict()
    for key in ("gamma", "gamma_grad", "alpha_unit", "alpha_layer", "alpha_global"):
        if a["param_groups"][0][key] is not None:
            assert a["param_groups"][0][key] == pytest.approx(b["param_groups"][0][key], rel=1e-5, abs=1e-12), key
    assert a["param_groups"][0]["negative_lr_steps"] == b["param_groups"][0]["negative_lr_steps"]
    assert a["param_groups"][0]["negative_lr_steps"] > 0 or not kw.get("clip_lr_at_zero")
    assert a["state"].keys() == b["state"].keys()
    for i, st in a["state"].items():
        assert st.keys() == b["state"][i].keys()
        for k, v in st.items():
            torch.testing.assert_close(v, b["state"][i][k], rtol=1e-5, atol=1e-7)
    for p, q in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    slow_opt.load_state_dict(a)
    train(slow, slow_opt, 1, seed=3, in_shape=(1, 6, 6))
    params = [p.detach().clone() for p in fast.parameters()]
    list(fast.parameters())[-1].grad.view(-1)[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        fast_opt.step()
    assert fast_opt.param_groups[0]["nonfinite_skipped"] == 1 and fast_opt.param_groups[0]["step"] == 6
    assert all(torch.equal(p, q) for p, q in zip(fast.parameters(), params))


@pytest.mark.parametrize("name", BASE_IDS)
def test_nonfinite_gradient_is_skipped_and_counted(name):
    model = mlp()
    opt = metaopt.make_optimizer(name, model.named_parameters(), levels=ALL_LEVELS)
    train(model, opt, 2)
    state_before, after = assert_nonfinite_step_is_skipped(model, opt)
    for key in ("gamma", "alpha_unit", "alpha_layer", "alpha_global", "step"):
        assert after["param_groups"][0][key] == state_before["param_groups"][0][key]
    raising = metaopt.make_optimizer(name, model.named_parameters(), nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite"):
        raising.step()


def test_overflowing_rate_is_skipped_like_a_nonfinite_gradient():
    """Finite gradients whose product with d_{t−1} overflows make h, hence the rates, infinite: nothing is written."""
    params, curv = quadratic(C1_SPLIT)
    opt = metaopt.make_optimizer("cam-hd-sgd", params, lr=0.1, hypergrad_lr=0.01)
    for _, p in params:
        p.grad = torch.full_like(p, 1e10)
    opt.step()
    before = [p.detach().clone() for _, p in params]
    state_before = copy.deepcopy(opt.state_dict())
    for _, p in params:
        p.grad = torch.full_like(p, 1e300)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(p, q) for (_, p), q in zip(params, before))
    after = opt.state_dict()
    assert after["param_groups"][0]["nonfinite_skipped"] == 1
    assert after["param_groups"][0]["alpha_global"] == state_before["param_groups"][0]["alpha_global"]
    for k, st in state_before["state"].items():
        assert all(torch.equal(after["state"][k][f], v) for f, v in st.items())


def test_parameters_without_gradient_are_untouched_and_contribute_nothing():
    params, curv = quadratic(C3_SPLIT)
    opt = metaopt.make_optimizer("cam-hd-sgdn", params, lr=0.1, hypergrad_lr=0.01, levels=ALL_LEVELS)
    ref, _ = quadratic({k: v for k, v in C3_SPLIT.items() if k != "l0.bias"})
    frozen_before = params[1][1].detach().clone()
    for _ in range(3):
        for n, p in params:
            p.grad = None if n == "l0.bias" else curv[n] * p.detach()
        opt.step()
    assert torch.equal(params[1][1], frozen_before)
    assert torch.equal(opt.state[params[1][1]]["alpha_param"], torch.full((2,), 0.1, dtype=F64))
    assert opt.state[params[1][1]]["momentum_buffer"].numel() == 0
    # the layout still covers the whole group: 2 layers, 2 + 1 units (l0.bias shares l0.weight's rows)
    assert len(opt.param_groups[0]["alpha_layer"]) == 2 and len(opt.param_groups[0]["alpha_unit"]) == 3


@pytest.mark.parametrize("clip", [False, True])
def test_negative_rates_are_counted_logged_and_optionally_clipped(clip, caplog):
    params, curv = quadratic({"l0.weight": ([2.0, 3.0], [1.0, -2.0], (2,))})
    # α0·a > 1: the iterate oscillates, g_t·g_{t−1} < 0, and a large β drives the rates below zero
    opt = metaopt.make_optimizer("cam-hd-sgd", params, lr=0.6, hypergrad_lr=1.0, levels=ALL_LEVELS,
                                 gamma_lr=0.0, clip_lr_at_zero=clip)
    with caplog.at_level("WARNING", logger="metaopt.hypergrad.cam_hd"):
        for _ in range(2):
            quad_step(opt, params, curv)
    group = opt.param_groups[0]
    assert group["negative_lr_steps"] >= 1
    assert "negative" in caplog.text
    lowest = min(group["alpha_unit"] + group["alpha_layer"] + [group["alpha_global"]]
                 + concat_state(opt, "alpha_param").tolist())
    assert (lowest == 0.0) if clip else (lowest < 0.0)


@pytest.mark.parametrize("kw,match", [
    (dict(gamma=(0.5, 0.5)), "gamma"),
    (dict(levels=("layer", "global"), gamma=(0.2, 0.3, 0.5)), "gamma"),
    (dict(levels=("parameter", "neuron", "global")), "unknown level 'neuron'"),
    (dict(levels=("global", "layer")), "levels"),
    (dict(levels=("layer", "layer")), "levels"),
    (dict(levels=()), "levels"),
    (dict(gamma_lr=-0.1), "gamma_lr"),
    (dict(gamma=(0.3, 0.3, 0.3)), "sum to 1"),
    (dict(gamma=(-0.1, 0.6, 0.5)), "gamma"),
    (dict(gamma_mode="exp"), "gamma_mode"),
    (dict(hypergrad_lr=-1e-3), "hypergrad_lr"),
    (dict(hypergrad_lr=(1e-3, 1e-3)), "hypergrad_lr"),
    (dict(beta_reduction="avg"), "beta_reduction"),
    (dict(decay=-0.1), "decay"),
    (dict(lr=-0.1), "learning rate"),
    (dict(nonfinite="ignore"), "nonfinite"),
    (dict(compile=1), "compile"),
    (dict(compile=True, fast=False), "fast=True"),
])
@pytest.mark.parametrize("name", BASE_IDS)
def test_invalid_hyperparameters_name_the_argument(name, kw, match):
    with pytest.raises(ValueError, match=match):
        metaopt.make_optimizer(name, [torch.zeros(2, requires_grad=True)], **kw)


def test_base_specific_validation_and_defaults():
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        metaopt.make_optimizer("cam-hd-adam", [torch.zeros(1, requires_grad=True)], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="momentum"):
        metaopt.make_optimizer("cam-hd-sgdn", [torch.zeros(1, requires_grad=True)], momentum=-0.5)
    group = metaopt.make_optimizer("cam-hd-adam", [torch.zeros(1, requires_grad=True)]).param_groups[0]
    assert (group["levels"], group["gamma"], group["hypergrad_lr"], group["gamma_lr"]) == (
        ("parameter", "layer", "global"), (0.3, 0.3, 0.4), 1e-7, 0.1)
    two = metaopt.make_optimizer("cam-hd-sgd", [torch.zeros(1, requires_grad=True)], levels=("filter", "global"))
    assert (two.param_groups[0]["levels"], two.param_groups[0]["gamma"]) == (("unit", "global"), (0.2, 0.8))
    assert {"cam-hd-sgd", "cam-hd-sgdn", "cam-hd-adam"} <= set(metaopt.registry.registered_names())


def test_an_lr_scheduler_scales_every_levels_rate_and_the_state_dict_keeps_the_last_lr_seen():
    """With the rates frozen (β = 0, δ = 0), halving ``lr`` halves every level's rate exactly; the face remembers the
    last ``lr`` it stepped with in the group, so a resumed optimizer does not scale twice."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    frozen_rates = dict(lr=0.05, hypergrad_lr=0.0, gamma_lr=0.0, levels=("parameter", "layer", "global"))
    opt = metaopt.hypergrad.cam_hd.CamHDAdam(model.named_parameters(), **frozen_rates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        scheduler.step()
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 / 8 and group["lr_seen"] == 0.05 / 4  # stepped at 0.05, 0.025, 0.0125
    assert group["alpha_global"] == 0.05 / 4 and group["alpha_layer"] == [0.05 / 4] * 2
    assert all(torch.all(opt.state[p]["alpha_param"] == 0.05 / 4) for p in model.parameters())
    resumed = metaopt.hypergrad.cam_hd.CamHDAdam(model.named_parameters(), **frozen_rates)
    resumed.load_state_dict(opt.state_dict())
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    resumed.step()
    assert resumed.param_groups[0]["alpha_global"] == 0.05 / 8
