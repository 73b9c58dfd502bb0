"""HD-val, RTHO and MARTHE (spec §5): oracles M-1…M-7, torch.optim equality at β = 0, the closure protocol,
exact resume, non-finite handling, bad input, and the differentiable core."""

import copy
import logging
import math

import pytest
import torch

import metaopt
import metaopt.hypergrad.hd  # noqa: F401  (registers sgd-hd)
import metaopt.hypergrad.marthe  # noqa: F401  (registers hd-val, rtho, marthe)
from metaopt.hypergrad.marthe import MartheDiagnostics, MartheRule

F64 = torch.float64
A = 2.0  # problem P1: f(x) = ½·a·x², a = 2, x0 = 1 (spec §1)


def p1_run(name, steps, **kw):
    """Run ``name`` on P1 with E = L (val_closure=None); returns the group after each call and x after each call."""
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer(name, [x], base="sgd", **kw)
    groups, xs = [dict(opt.param_groups[0])], [x.item()]
    for _ in range(steps):
        opt.step(lambda: 0.5 * A * (x * x).sum())
        groups.append(dict(opt.param_groups[0]))
        xs.append(x.item())
    return groups, xs, opt


def mlp(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)


def batches(n, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen, dtype=dtype), torch.randn(8, 2, generator=gen, dtype=dtype))
            for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


# ----------------------------------------------------------------------------------------------------------------------
# M-1: μ = 0 is HD


def test_M1_mu_zero_is_hd_closed_form_P1():
    groups, xs, opt = p1_run("hd-val", 4, lr=0.1, hypergrad_lr=0.01)
    lrs = [g["lr"] for g in groups]
    for got, want in zip(lrs, [0.1, 0.132, 0.1508416, 0.1605254506826957]):
        assert got == pytest.approx(want, rel=1e-15, abs=0)
    for got, want in zip(xs[1:], [0.8, 0.5888, 0.41116893184]):  # SGD-HD's x_1..x_3 (SGDHD-3)
        assert got == pytest.approx(want, rel=1e-15)
    assert opt.param_groups[0]["hvp_evals"] == 0 and opt.param_groups[0]["val_evals"] == 4


def test_M1_mu_zero_on_P1_equals_sgd_hd_shifted_by_one():
    """η_k = α^{SGD-HD}_{k+1}, and the x trajectories are identical."""
    groups, xs, _ = p1_run("hd-val", 6, lr=0.1, hypergrad_lr=0.01)
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    hd = metaopt.make_optimizer("sgd-hd", [x], lr=0.1, hypergrad_lr=0.01)
    for k in range(6):
        hd.zero_grad()
        (0.5 * A * (x * x).sum()).backward()
        hd.step()
        assert hd.param_groups[0]["lr"] == pytest.approx(groups[k]["lr"], rel=1e-15)
        assert x.item() == pytest.approx(xs[k + 1], rel=1e-15)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.0, 1e-2), (0.9, 1e-2)])
def test_M1_hd_train_mode_equals_sgd_hd_on_the_same_batches(momentum, weight_decay):
    """HD-train (E = the next training batch, its gradient reused) is SGD-HD exactly, bit for bit."""
    data = batches(12)
    ours, ref = mlp(), mlp()
    base = "momentum" if momentum else "sgd"
    opt = metaopt.make_optimizer("hd-val", ours.parameters(), lr=0.05, hypergrad_lr=1e-3, base=base,
                                 weight_decay=weight_decay, hyper_objective="next-batch",
                                 **({"momentum": momentum} if momentum else {}))
    ref_opt = metaopt.make_optimizer("sgd-hd", ref.parameters(), lr=0.05, hypergrad_lr=1e-3, momentum=momentum,
                                     weight_decay=weight_decay)
    for batch in data:
        opt.step(lambda: mse(ours, batch))
        ref_opt.zero_grad()
        mse(ref, batch).backward()
        ref_opt.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(p, q)
    assert ref_opt.param_groups[0]["lr"] != 0.05  # the rate did move
    assert opt.param_groups[0]["hvp_evals"] == 0 and opt.param_groups[0]["val_evals"] == 0


def test_M1_hd_train_mode_with_adam_equals_adam_hd_on_the_same_batches():
    """The same identity over Adam: Δη = −⟨g_{t+1}, d_t⟩ with d_t Adam's direction is Adam-HD's h (spec §4)."""
    data = batches(12, seed=21)
    ours, ref = mlp(12), mlp(12)
    opt = metaopt.make_optimizer("hd-val", ours.parameters(), lr=1e-2, hypergrad_lr=1e-4, base="adam",
                                 weight_decay=1e-2, hyper_objective="next-batch")
    ref_opt = metaopt.make_optimizer("adam-hd", ref.parameters(), lr=1e-2, hypergrad_lr=1e-4, weight_decay=1e-2)
    for batch in data:
        opt.step(lambda: mse(ours, batch))
        ref_opt.zero_grad()
        mse(ref, batch).backward()
        ref_opt.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(p, q)
    assert ref_opt.param_groups[0]["lr"] != 1e-2


# ----------------------------------------------------------------------------------------------------------------------
# M-2, M-4: μ = 1 is RTHO, and adaptive μ picks μ = 1 on a convex 1-D quadratic


def rtho_closed_form(steps, eta0=0.1, beta=0.01, a=A, w0=1.0):
    """η_t from Z_t = −a·w_t·S_t, S_{t+1} = S_t + 1/(1 − η_t·a), Δη_t = −a²·w_t²·S_t (spec M-2, App. A4)."""
    w, s, eta, out = w0, 0.0, eta0, [eta0]
    for _ in range(steps):
        s = s + 1.0 / (1.0 - eta * a)
        w = w * (1.0 - eta * a)
        eta = max(eta + beta * a * a * w * w * s, 0.0)
        out.append(eta)
    return out


def test_M2_rtho_closed_form_P1():
    groups, _, opt = p1_run("rtho", 6, lr=0.1, hypergrad_lr=0.01)
    lrs = [g["lr"] for g in groups]
    assert lrs[1:4] == pytest.approx([0.132, 0.168175872, 0.19331186291281077], rel=1e-15)
    assert lrs == pytest.approx(rtho_closed_form(6), rel=1e-14)
    assert lrs[2] != pytest.approx(0.1508416)  # the HD value
    # One HVP per step except the first (Z_0 = 0), one validation pass per step.
    assert opt.param_groups[0]["hvp_evals"] == 5 and opt.param_groups[0]["val_evals"] == 6


def test_M4_adaptive_mu_selects_one_on_convex_quadratic():
    groups, _, _ = p1_run("marthe", 6, lr=0.1, hypergrad_lr=0.01, adapt_hypergrad_lr=None)
    assert [g["lr"] for g in groups] == pytest.approx(rtho_closed_form(6), rel=1e-14)
    assert all(g["damping"] == 1.0 for g in groups[1:])
    assert [g["horizon"] for g in groups[1:]] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # c_{t+1} = μ_t(1 + c_t), μ_0 = 0


def test_M2_param_groups_are_independent_tangent_systems():
    """Two groups on a separable quadratic (no cross-group curvature): each group's η follows RTHO on its own
    coordinate exactly, as if optimized alone."""
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    y = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("rtho", [{"params": [x]}, {"params": [y], "lr": 0.05}], lr=0.1, hypergrad_lr=0.01,
                                 base="sgd")
    lrs = [[0.1], [0.05]]
    for _ in range(5):
        opt.step(lambda: 0.5 * A * (x * x).sum() + 0.5 * 5.0 * (y * y).sum())
        lrs[0].append(opt.param_groups[0]["lr"])
        lrs[1].append(opt.param_groups[1]["lr"])
    assert lrs[0] == pytest.approx(rtho_closed_form(5), rel=1e-14)
    assert lrs[1] == pytest.approx(rtho_closed_form(5, eta0=0.05, a=5.0), rel=1e-14)
    assert [g["hvp_evals"] for g in opt.param_groups] == [4, 4]


# ----------------------------------------------------------------------------------------------------------------------
# M-3: the tangent against finite differences


H2 = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=F64)


def quadratic(w):
    return 0.5 * w @ H2 @ w


def quartic(w):
    return 0.5 * w @ H2 @ w + 0.25 * (w**4).sum()


# base, our kwargs, torch class and kwargs, f, w0, schedule, Z_T at μ = 1, Z_T at μ = 0 (spec M-3)
M3_CASES = {
    "sgd": ("sgd", {}, torch.optim.SGD, {}, quadratic, (1.0, -2.0), (0.1, 0.2, 0.15, 0.3),
            (-1.31734375, 4.2471875), (-0.5023125, 1.1665)),
    "momentum": ("momentum", dict(momentum=0.9, weight_decay=0.01), torch.optim.SGD,
                 dict(momentum=0.9, weight_decay=0.01), quartic, (1.0, -0.7), (0.05, 0.08, 0.06, 0.1, 0.07),
                 (-5.402970739416, 7.862571811427), (-2.718273982585, 2.438247804626)),
    "adam": ("adam", dict(betas=(0.9, 0.999), eps=1e-8), torch.optim.Adam, dict(betas=(0.9, 0.999), eps=1e-8),
             quartic, (1.0, -0.7), (0.05, 0.08, 0.06, 0.1, 0.07),
             (-4.824676026208, 4.268372343805), (-0.964162147757, 0.863084860487)),
    # Beyond the spec's table: Adam with weight decay in L (so H includes λI), finite differences only.
    "adam-wd": ("adam", dict(betas=(0.8, 0.99), eps=1e-3, weight_decay=0.05), torch.optim.Adam,
                dict(betas=(0.8, 0.99), eps=1e-3, weight_decay=0.05), quartic, (1.0, -0.7),
                (0.05, 0.08, 0.06, 0.1, 0.07), None, None),
}


def tangent_after_schedule(name, base, kw, f, w0, schedule):
    w = torch.tensor(w0, dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer(name, [w], lr=schedule[0], hypergrad_lr=0.0, base=base, **kw)
    for eta in schedule:
        opt.param_groups[0]["lr"] = eta  # β = 0: the schedule is fixed and set from outside
        opt.step(lambda: f(w))
    return opt.state[w]["tangent"]


def torch_final_weights(torch_cls, torch_kw, f, w0, schedule):
    w = torch.tensor(w0, dtype=F64, requires_grad=True)
    opt = torch_cls([w], lr=schedule[0], foreach=False, **torch_kw)
    for eta in schedule:
        opt.param_groups[0]["lr"] = eta
        opt.zero_grad()
        f(w).backward()
        opt.step()
    return w.detach()


@pytest.mark.parametrize("case", list(M3_CASES))
@pytest.mark.parametrize("mu", [1.0, 0.0])
def test_M3_tangent_equals_finite_differences(case, mu):
    base, kw, torch_cls, torch_kw, f, w0, schedule, z_rtho, z_hd = M3_CASES[case]
    name = "rtho" if mu == 1.0 else "hd-val"
    z = tangent_after_schedule(name, base, kw, f, w0, schedule)
    if z_rtho is not None:
        assert z.tolist() == pytest.approx(z_rtho if mu == 1.0 else z_hd, abs=1e-11)
    # μ = 1: all η_i shifted (the total derivative along 1); μ = 0: only η_{T-1} shifted.
    eps = 1e-6
    shift = torch.ones(len(schedule), dtype=F64) if mu == 1.0 else torch.eye(len(schedule), dtype=F64)[-1]
    eta = torch.tensor(schedule, dtype=F64)
    plus = torch_final_weights(torch_cls, torch_kw, f, w0, (eta + eps * shift).tolist())
    minus = torch_final_weights(torch_cls, torch_kw, f, w0, (eta - eps * shift).tolist())
    torch.testing.assert_close(z, (plus - minus) / (2 * eps), rtol=1e-7, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------------
# M-5, M-6: μ reset and the sign of the β update


def test_M5_mu_reset():
    groups, _, _ = p1_run("marthe", 3, lr=0.45, hypergrad_lr=0.5, adapt_hypergrad_lr=None)
    assert [g["lr"] for g in groups] == pytest.approx([0.45, 0.65, 0.662, 0.6614168], rel=1e-14)
    assert [g["damping"] for g in groups[1:]] == [1.0, 0.0, 1.0]  # μ_2 = 0 because r = −2
    assert [g["horizon"] for g in groups[2:]] == [1.0, 0.0]       # c_2 = 1, c_3 = 0


def test_M6_beta_update_sign_corrected_and_paper_literal():
    beta_hyper, a, w0 = 0.01, A, 1.0
    groups, _, _ = p1_run("marthe", 2, lr=0.0, hypergrad_lr=0.0, adapt_hypergrad_lr=beta_hyper)
    assert groups[1]["lr"] == 0.0 and groups[1]["hypergrad_lr"] == 0.0  # η_1 = 0, β_1 = 0
    assert groups[2]["hypergrad_lr"] == pytest.approx(2 * beta_hyper * a**4 * w0**4, rel=1e-15)  # 0.32
    assert groups[2]["lr"] == pytest.approx(4 * beta_hyper * a**6 * w0**6, rel=1e-15)  # 2.56
    assert groups[2]["lr"] == pytest.approx(2.56, rel=1e-15)

    literal, _, _ = p1_run("marthe", 8, lr=0.0, hypergrad_lr=0.0, adapt_hypergrad_lr=beta_hyper,
                           paper_beta_sign=True)
    assert all(g["lr"] == 0.0 and g["hypergrad_lr"] == 0.0 for g in literal)


# ----------------------------------------------------------------------------------------------------------------------
# M-7: invariants and costs


def test_M7_invariants_eta_beta_nonnegative_mu_in_unit_interval(caplog):
    model = mlp(3)
    train, val = batches(30, seed=4), batches(30, seed=5)
    opt = metaopt.make_optimizer("marthe", model.parameters(), lr=0.05, hypergrad_lr=0.0, base="sgd",
                                 adapt_hypergrad_lr=1.0)  # a large β_hyper: the clip of η acts
    mus, expected_hvps = set(), 0
    with caplog.at_level(logging.INFO, logger="metaopt.hypergrad.marthe"):
        for t, (tb, vb) in enumerate(zip(train, val)):
            expected_hvps += t > 0 and opt.param_groups[0].get("damping", 0.0) != 0.0  # μ_t = 0 evaluates no HVP
            opt.step(lambda: mse(model, tb), lambda: mse(model, vb))
            g = opt.param_groups[0]
            assert g["lr"] >= 0.0 and g["hypergrad_lr"] >= 0.0 and 0.0 <= g["damping"] <= 1.0
            mus.add(g["damping"])
    g = opt.param_groups[0]
    assert g["lr_clipped"] > 0 and "clipped at 0" in caplog.text
    assert len(mus) > 1  # the damping did adapt
    assert g["nonfinite_skipped"] == 0 and g["val_evals"] == len(train)
    assert g["hvp_evals"] == expected_hvps < len(train) - 1


class _Square(torch.autograd.Function):
    """x², recording whether its backward runs with grad mode on (it does exactly under create_graph=True)."""
    grad_mode_in_backward: list[bool] = []

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        _Square.grad_mode_in_backward.append(torch.is_grad_enabled())
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.mark.parametrize("name,hvps,graphs", [("hd-val", 0, False), ("rtho", 4, True), ("marthe", 4, True)])
def test_M7_costs_hvp_and_validation_counts_and_no_create_graph_at_mu_zero(name, hvps, graphs):
    w = torch.tensor([1.0, -0.5], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer(name, [w], lr=0.1, hypergrad_lr=1e-3, base="sgd")
    _Square.grad_mode_in_backward.clear()
    for _ in range(5):
        opt.step(lambda: (_Square.apply(w) * torch.tensor([1.5, 1.0], dtype=F64)).sum())
    g = opt.param_groups[0]
    assert g["hvp_evals"] == hvps and g["val_evals"] == 5
    # Per step: the training backward (create_graph from step 1 on when an HVP is needed) and the validation one.
    train_modes = _Square.grad_mode_in_backward[0::2]
    assert train_modes[0] is False and all(m is graphs for m in train_modes[1:])
    assert not any(_Square.grad_mode_in_backward[1::2])


@pytest.mark.parametrize("name", ["hd-val", "rtho"])
def test_M7_eta0_zero_gives_beta_times_gradient_norm(name):
    model = mlp(2)
    batch = batches(1)[0]
    beta = 0.3
    opt = metaopt.make_optimizer(name, model.parameters(), lr=0.0, hypergrad_lr=beta, base="sgd")
    grads = torch.autograd.grad(mse(model, batch), list(model.parameters()))
    opt.step(lambda: mse(model, batch))
    norm2 = sum((g * g).sum() for g in grads).item()
    assert opt.param_groups[0]["lr"] == pytest.approx(beta * norm2, rel=1e-13)


# ----------------------------------------------------------------------------------------------------------------------
# Validation objective, β = 0 equals torch.optim


def test_hd_val_first_rate_uses_the_validation_gradient():
    """η_1 = η_0 − β·Δη_1 with Δη_1 = ⟨∇E(w_1), −g_0⟩ on a separate validation batch."""
    model, ref = mlp(6), mlp(6)
    train, val = batches(1, seed=7)[0], batches(1, seed=8)[0]
    opt = metaopt.make_optimizer("hd-val", model.parameters(), lr=0.1, hypergrad_lr=0.05, base="sgd")
    opt.step(lambda: mse(model, train), lambda: mse(model, val))
    g0 = torch.autograd.grad(mse(ref, train), list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), g0):
            p.sub_(0.1 * g)
    e1 = torch.autograd.grad(mse(ref, val), list(ref.parameters()))
    delta = -sum((e * g).sum() for e, g in zip(e1, g0)).item()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 - 0.05 * delta, rel=1e-14)
    assert opt.param_groups[0]["delta_lr"] == pytest.approx(delta, rel=1e-13)
    diag = opt.diagnostics[0]
    assert isinstance(diag, MartheDiagnostics) and diag.g1 == pytest.approx(delta, rel=1e-13)  # μ = 0: Δη = g'_1


@pytest.mark.parametrize("name", ["hd-val", "rtho", "marthe"])
@pytest.mark.parametrize("base,kw,torch_cls,torch_kw", [
    ("sgd", dict(lr=0.05), torch.optim.SGD, dict(lr=0.05)),
    ("momentum", dict(lr=0.05, momentum=0.8, weight_decay=1e-2), torch.optim.SGD,
     dict(lr=0.05, momentum=0.8, weight_decay=1e-2)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2), torch.optim.Adam,
     dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_hypergrad_lr_zero_equals_torch_optim_bit_for_bit(name, base, kw, torch_cls, torch_kw, dtype):
    ours, ref = mlp(dtype=dtype), mlp(dtype=dtype)
    train, val = batches(6, dtype=dtype), batches(6, seed=9, dtype=dtype)
    opt = metaopt.make_optimizer(name, ours.parameters(), base=base, hypergrad_lr=0.0, adapt_hypergrad_lr=None,
                                 **kw)
    ref_opt = torch_cls(ref.parameters(), foreach=False, **torch_kw)
    for tb, vb in zip(train, val):
        opt.step(lambda: mse(ours, tb), lambda: mse(ours, vb))
        ref_opt.zero_grad()
        mse(ref, tb).backward()
        ref_opt.step()
    assert opt.param_groups[0]["lr"] == kw["lr"]
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_default_hyperparameters_per_name_and_base():
    w = [torch.zeros(2, requires_grad=True)]
    cases = [("marthe", {}, 0.1, 0.0, "adaptive", 1e-6), ("marthe", dict(base="adam"), 3e-4, 0.0, "adaptive", 1e-6),
             ("marthe", dict(base="sgd"), 0.01, 0.0, "adaptive", 1e-6), ("rtho", {}, 0.1, 1e-8, 1.0, None),
             ("hd-val", {}, 0.1, 1e-6, 0.0, None)]
    for name, kw, lr, beta, mu, beta_hyper in cases:
        g = metaopt.make_optimizer(name, w, **kw).param_groups[0]
        assert (g["lr"], g["hypergrad_lr"], g["mu"], g["adapt_hypergrad_lr"]) == (lr, beta, mu, beta_hyper)
    assert metaopt.make_optimizer("marthe", w).param_groups[0]["momentum"] == 0.9


# ----------------------------------------------------------------------------------------------------------------------
# The closure protocol


def _closure_variants(model, batch):
    def pure():
        return mse(model, batch)

    def calls_backward():
        model.zero_grad()
        loss = mse(model, batch)
        loss.backward()
        return loss

    def calls_autograd_backward():
        model.zero_grad()
        loss = mse(model, batch)
        torch.autograd.backward(loss)
        return loss

    def retains_graph():
        model.zero_grad()
        loss = mse(model, batch)
        loss.backward(retain_graph=True)
        return loss

    return {"pure": pure, "backward": calls_backward, "autograd.backward": calls_autograd_backward,
            "retain_graph": retains_graph}


@pytest.mark.parametrize("variant", ["backward", "autograd.backward", "retain_graph"])
@pytest.mark.parametrize("base", ["momentum", "adam"])
def test_closure_that_calls_backward_gives_the_same_trajectory(variant, base):
    """A torch.optim-style closure (zero_grad; loss.backward(); return loss), in training and validation, works and
    changes nothing: the optimizer keeps that closure's graph alive and differentiates the returned loss itself."""
    train, val = batches(6, seed=11), batches(6, seed=12)
    results = {}
    for kind in ("pure", variant):
        model = mlp(7)
        opt = metaopt.make_optimizer("marthe", model.parameters(), base=base, lr=0.05, hypergrad_lr=1e-3)
        for tb, vb in zip(train, val):
            opt.step(_closure_variants(model, tb)[kind], _closure_variants(model, vb)[kind])
        results[kind] = (model, opt)
    (m0, o0), (m1, o1) = results["pure"], results[variant]
    for p, q in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(p, q)
    assert o0.param_groups[0]["lr"] == o1.param_groups[0]["lr"] != 0.05
    assert o1.param_groups[0]["hvp_evals"] == o0.param_groups[0]["hvp_evals"] > 0
    # The user's p.grad holds what the closure's own backward produced (here: the last validation batch).
    expected = torch.autograd.grad(mse(m1, val[-1]), list(m1.parameters()))
    for p, g in zip(m1.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_closure_must_return_a_loss_with_graph():
    w = torch.zeros(2, requires_grad=True)
    opt = metaopt.make_optimizer("marthe", [w])
    with pytest.raises(TypeError, match="closure must return the loss"):
        opt.step(lambda: (w * w).sum().item())
    with pytest.raises(ValueError, match="closure"):
        opt.step()


# ----------------------------------------------------------------------------------------------------------------------
# Resume, non-finite, bad input


@pytest.mark.parametrize("name,base", [("marthe", "sgd"), ("marthe", "momentum"), ("marthe", "adam"),
                                       ("rtho", "momentum"), ("hd-val", "adam")])
def test_state_dict_resume_is_bit_exact(name, base):
    train, val = batches(10, seed=13), batches(10, seed=14)
    kw = dict(base=base, lr=0.05 if base != "adam" else 1e-2, hypergrad_lr=1e-3)

    def run(model, opt, idx):
        for i in idx:
            opt.step(lambda: mse(model, train[i]), lambda: mse(model, val[i]))

    straight = mlp(8)
    opt = metaopt.make_optimizer(name, straight.parameters(), **kw)
    run(straight, opt, range(10))

    resumed = mlp(8)
    first = metaopt.make_optimizer(name, resumed.parameters(), **kw)
    run(resumed, first, range(5))
    saved = copy.deepcopy(first.state_dict())
    group = saved["param_groups"][0]
    assert {"lr", "hypergrad_lr", "damping", "horizon", "delta_lr", "step"} <= set(group)
    tangents = {"sgd": {"tangent"}, "momentum": {"tangent", "tangent_momentum_buffer"},
                "adam": {"tangent", "tangent_exp_avg", "tangent_exp_avg_sq"}}[base]
    assert tangents | {"direction"} <= set(saved["state"][0])
    second = metaopt.make_optimizer(name, resumed.parameters(), **kw)
    second.load_state_dict(saved)
    run(resumed, second, range(5, 10))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for key in ("lr", "hypergrad_lr", "damping", "horizon", "delta_lr", "hvp_evals", "val_evals"):
        assert opt.param_groups[0][key] == second.param_groups[0][key]


def test_nonfinite_training_gradient_is_skipped_and_counted():
    model = mlp(9)
    train, val = batches(3, seed=15), batches(3, seed=16)
    opt = metaopt.make_optimizer("marthe", model.parameters(), lr=0.05, hypergrad_lr=1e-3)
    for tb, vb in zip(train[:2], val[:2]):
        opt.step(lambda: mse(model, tb), lambda: mse(model, vb))
    params_before = [p.clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: mse(model, train[2]) * float("nan"), lambda: mse(model, val[2]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
    after = opt.state_dict()
    assert after["param_groups"][0]["nonfinite_skipped"] == 1
    for key, value in state_before["param_groups"][0].items():
        if key != "nonfinite_skipped":
            assert after["param_groups"][0][key] == value
    for k, st in state_before["state"].items():
        for field, v in st.items():
            assert torch.equal(after["state"][k][field], v)


def test_nonfinite_validation_gradient_skips_only_the_rate_update():
    model = mlp(10)
    train, val = batches(2, seed=17), batches(2, seed=18)
    opt = metaopt.make_optimizer("marthe", model.parameters(), lr=0.05, hypergrad_lr=1e-3)
    opt.step(lambda: mse(model, train[0]), lambda: mse(model, val[0]))
    hyper = {k: opt.param_groups[0][k] for k in ("lr", "hypergrad_lr", "damping", "horizon", "delta_lr")}
    before = [p.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: mse(model, train[1]), lambda: mse(model, val[1]) * float("inf"))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the parameter step happened
    assert {k: opt.param_groups[0][k] for k in hyper} == hyper
    assert opt.param_groups[0]["nonfinite_skipped"] == 1


def test_a_rate_beyond_the_parameters_float_range_is_skipped_not_a_crash(monkeypatch):
    """η finite in the float64 rule but past float32's range (a diverging adaptive-β run of marthe-schedules reached
    it) cannot be applied to float32 weights: the hyper-step is skipped and counted like a non-finite one, and the
    next steps run at the last representable rate instead of raising in torch.add."""
    from metaopt.hypergrad.marthe import MartheRule

    model = mlp(11, dtype=torch.float32)
    train, val = batches(3, seed=19, dtype=torch.float32), batches(3, seed=20, dtype=torch.float32)
    opt = metaopt.make_optimizer("marthe", model.parameters(), lr=0.05, hypergrad_lr=1e-3)
    opt.step(lambda: mse(model, train[0]), lambda: mse(model, val[0]))
    lr_before = opt.param_groups[0]["lr"]
    original = MartheRule.hyper_step

    def overflowing(self, state, val_grads, mu=None):
        new_state, diag = original(self, state, val_grads, mu=mu)
        return new_state._replace(lr=1e39), diag

    monkeypatch.setattr(MartheRule, "hyper_step", overflowing)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: mse(model, train[1]), lambda: mse(model, val[1]))
    assert opt.param_groups[0]["lr"] == lr_before and opt.param_groups[0]["nonfinite_skipped"] == 1
    monkeypatch.setattr(MartheRule, "hyper_step", original)
    opt.step(lambda: mse(model, train[2]), lambda: mse(model, val[2]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_raise_mode():
    w = torch.ones(2, dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("rtho", [w], nonfinite="raise")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(lambda: (w * float("inf")).sum())


@pytest.mark.parametrize("name,kw,match", [
    ("marthe", dict(base="rmsprop"), "base"),
    ("marthe", dict(mu=1.5), "mu"),
    ("marthe", dict(mu=-0.1), "mu"),
    ("marthe", dict(mu="auto"), "mu"),
    ("marthe", dict(lr=-0.1), "learning rate"),
    ("marthe", dict(hypergrad_lr=-1e-3), "hypergrad_lr"),
    ("marthe", dict(adapt_hypergrad_lr=-1.0), "adapt_hypergrad_lr"),
    ("marthe", dict(base="sgd", momentum=0.9), "momentum"),
    ("marthe", dict(momentum=1.0), "momentum"),
    ("marthe", dict(base="adam", betas=(1.0, 0.999)), "beta parameter at index 0"),
    ("marthe", dict(weight_decay=-1.0), "weight_decay"),
    ("marthe", dict(hyper_objective="test"), "hyper_objective"),
    ("marthe", dict(nonfinite="ignore"), "nonfinite"),
    ("hd-val", dict(mu=0.5), "mu"),
    ("rtho", dict(mu="adaptive"), "mu"),
])
def test_invalid_hyperparameters_name_the_argument(name, kw, match):
    with pytest.raises(ValueError, match=match):
        metaopt.make_optimizer(name, [torch.zeros(1, requires_grad=True)], **kw)


def test_next_batch_mode_rejects_a_validation_closure():
    w = torch.zeros(1, requires_grad=True)
    opt = metaopt.make_optimizer("hd-val", [w], hyper_objective="next-batch")
    with pytest.raises(ValueError, match="val_closure"):
        opt.step(lambda: (w * w).sum(), lambda: (w * w).sum())


# ----------------------------------------------------------------------------------------------------------------------
# The functional core: the μ hook and differentiability in a tensor μ


def test_mu_rule_hook_sees_the_diagnostics_and_replaces_h_mu():
    """A damping rule supplied from outside, here h_μ written out from the diagnostics, reproduces the built-in one."""
    seen = []

    def h_mu(diag):
        seen.append(diag)
        return diag.q_tilde ** (1.0 / (diag.horizon + 1.0))

    train, val = batches(6, seed=19), batches(6, seed=20)
    runs = []
    for rule in (None, h_mu):
        model = mlp(11)
        opt = metaopt.make_optimizer("marthe", model.parameters(), lr=0.05, hypergrad_lr=1e-2, mu_rule=rule)
        for tb, vb in zip(train, val):
            opt.step(lambda: mse(model, tb), lambda: mse(model, vb))
        runs.append((model, opt))
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(p, q)
    assert [d.q_tilde for d in seen][-1] == runs[0][1].diagnostics[0].q_tilde
    d = seen[-1]
    assert d.q_tilde == min(max(d.ratio, 0.0), 1.0) and d.ratio == pytest.approx(d.delta_lr / d.g1)


def _core_run(base, mu, steps=5, external_mu=None):
    """Unrolled core on f(w) = ½wᵀHw + ¼Σw⁴ (training) and E(w) = ½‖w − w*‖² (validation), analytic HVP."""
    target = torch.tensor([0.3, 0.2], dtype=F64)
    kw = dict(momentum=0.5) if base == "momentum" else {}
    # Mild settings: the clips at 0 (zero derivatives) must not act on this short unroll.
    rule = MartheRule(lr=0.05, hypergrad_lr=0.01, base=base, mu=mu, weight_decay=0.01, adapt_hypergrad_lr=0.01, **kw)
    params = {"w": torch.tensor([1.0, -0.7], dtype=F64)}
    state = rule.init(params)
    for _ in range(steps):
        w = params["w"]
        grads = {"w": H2 @ w + w**3}
        hvp = (lambda z, w=w: {"w": H2 @ z["w"] + 3 * w**2 * z["w"]})
        params, state = rule.step(params, grads, state, hvp=hvp)
        state, _ = rule.hyper_step(state, {"w": params["w"] - target}, mu=external_mu)
    return 0.5 * ((params["w"] - target) ** 2).sum()


@pytest.mark.parametrize("base", ["sgd", "momentum", "adam"])
def test_core_is_differentiable_in_a_tensor_mu_finite_difference(base):
    mu0, h = 0.7, 1e-6
    mu = torch.tensor(mu0, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(_core_run(base, mu), mu)
    fd = (_core_run(base, mu0 + h) - _core_run(base, mu0 - h)) / (2 * h)
    assert grad.item() != 0
    assert grad.item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-10)
    # Supplying μ_{t+1} from outside (the learned-μ hook) is differentiable the same way.
    mu_ext = torch.tensor(mu0, dtype=F64, requires_grad=True)
    (grad_ext,) = torch.autograd.grad(_core_run(base, mu_ext, external_mu=mu_ext), mu_ext)
    assert grad_ext.item() == pytest.approx(grad.item(), rel=1e-12)


def test_core_float_mu_equals_face():
    """The face is the core: a core loop with float hyper-parameters matches the optimizer's first steps."""
    w = torch.tensor([1.0, -0.7], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("rtho", [w], lr=0.05, hypergrad_lr=0.05, base="sgd")
    for _ in range(3):
        opt.step(lambda: quartic(w))
    rule = MartheRule(lr=0.05, hypergrad_lr=0.05, base="sgd", mu=1.0)
    params = {"w": torch.tensor([1.0, -0.7], dtype=F64)}
    state = rule.init(params)
    for _ in range(3):
        v = params["w"]
        params, state = rule.step(params, {"w": H2 @ v + v**3}, state,
                                  hvp=lambda z, v=v: {"w": H2 @ z["w"] + 3 * v**2 * z["w"]})
        state, _ = rule.hyper_step(state, {"w": H2 @ params["w"] + params["w"] ** 3})
    torch.testing.assert_close(params["w"], w.detach(), rtol=1e-14, atol=1e-15)
    assert isinstance(state.lr, float) and state.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-14)
    assert math.isclose(state.damping, 1.0)
