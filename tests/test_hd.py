"""SGD-HD, SGDN-HD (and heavy ball) and Adam-HD: every oracle of specs/hypergradient.md §2–§4, plus torch.optim
equality at hypergrad_lr = 0, partition invariance, exact resume, non-finite handling, negative-α accounting and
finite-difference checks of the functional core's derivatives."""

import copy
import logging

import pytest
import torch
from helpers import assert_nonfinite_step_is_skipped, assert_same_parameters_and_state

import metaopt
import metaopt.hypergrad.hd  # noqa: F401  (registers sgd-hd, sgdn-hd, adam-hd)
from metaopt.hypergrad.hd import (
    AdamHDRule,
    SGDHDRule,
    adam_hypergradient,
    global_hypergradient,
    update_learning_rate,
)

F64 = torch.float64


def exact(value):
    """'exact' in the spec: ≤ 1e-15 relative in float64."""
    return pytest.approx(value, rel=1e-15, abs=0.0)


# -- harnesses ---------------------------------------------------------------------------------------------------------


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def run(model, opt, steps, seed=1, fixed_batch=False, zero_grad_to_none=True):
    """Minibatch MSE regression; returns the learning rate after each step."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    lrs = []
    x = torch.randn(16, 5, generator=gen).to(dtype)
    y = torch.randn(16, 3, generator=gen).to(dtype)
    for _ in range(steps):
        if not fixed_batch:
            x = torch.randn(16, 5, generator=gen).to(dtype)
            y = torch.randn(16, 3, generator=gen).to(dtype)
        opt.zero_grad(set_to_none=zero_grad_to_none)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def quadratic(name, a, x0, steps, **kw):
    """Separable quadratic f = ½ Σ a_i x_i², one tensor per entry of ``a`` / ``x0`` (P1: a = 2, x0 = 1).

    Returns (lr after each step, list of parameter values after each step, optimizer, params)."""
    params = [torch.tensor(v, dtype=F64).reshape(-1).clone().requires_grad_() for v in x0]
    curv = [torch.tensor(v, dtype=F64).reshape(-1) for v in a]
    opt = metaopt.make_optimizer(name, params, **kw)
    lrs, xs = [], []
    for _ in range(steps):
        for p, c in zip(params, curv):
            p.grad = c * p.detach()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        xs.append([p.detach().clone() for p in params])
    return lrs, xs, opt, params


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# -- SGD-HD (spec §2) --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.05, weight_decay=0.01)])
def test_SGDHD_1_zero_hypergrad_lr_is_torch_sgd_bit_for_bit(kw, dtype):
    ours, ref = make_model(dtype), make_model(dtype)
    lrs = run(ours, metaopt.make_optimizer("sgd-hd", ours.parameters(), hypergrad_lr=0.0, **kw), 12)
    run(ref, torch.optim.SGD(ref.parameters(), foreach=False, **kw), 12)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()
    assert all(type(lr) is float and lr == kw["lr"] for lr in lrs)


@pytest.mark.parametrize("name,kw", [("sgd-hd", dict(weight_decay=0.01)), ("sgdn-hd", {}),
                                     ("sgd-hd", dict(momentum=0.9)), ("adam-hd", dict(hypergrad_lr=1e-3))])
def test_SGDHD_2_first_step_keeps_lr_and_matches_the_base(name, kw):
    """α_1 = α_0 on any data (h_1 = 0), so step 1 is exactly the base optimizer's step with lr = α_0."""
    ours, ref = make_model(F64), make_model(F64)
    (lr1,) = run(ours, metaopt.make_optimizer(name, ours.parameters(), lr=0.07, **kw), 1)
    assert lr1 == 0.07
    base_kw = {k: v for k, v in kw.items() if k != "hypergrad_lr"}
    if name == "sgdn-hd":
        base = torch.optim.SGD(ref.parameters(), lr=0.07, momentum=0.9, nesterov=True, foreach=False)
    elif name == "adam-hd":
        base = torch.optim.Adam(ref.parameters(), lr=0.07, foreach=False)
    else:
        base = torch.optim.SGD(ref.parameters(), lr=0.07, foreach=False, **base_kw)
    run(ref, base, 1)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_SGDHD_3_P1_closed_form():
    lrs, xs, _, _ = quadratic("sgd-hd", [2.0], [1.0], 4, lr=0.1, hypergrad_lr=0.01)
    assert lrs == [exact(0.1), exact(0.132), exact(0.1508416), exact(0.1605254506826957)]
    assert [x[0].item() for x in xs[:3]] == [exact(0.8), exact(0.5888), exact(0.41116893184)]
    # The closed forms themselves, on a second quadratic.
    a, x0, lr0, beta = 1.5, -0.7, 0.2, 0.05
    lrs, _, _, _ = quadratic("sgd-hd", [a], [x0], 3, lr=lr0, hypergrad_lr=beta)
    lr2 = lr0 + beta * a**2 * x0**2 * (1 - lr0 * a)
    lr3 = lr2 + beta * a**2 * x0**2 * (1 - lr0 * a) ** 2 * (1 - lr2 * a)
    assert lrs == [lr0, pytest.approx(lr2, rel=1e-14), pytest.approx(lr3, rel=1e-14)]


def test_SGDHD_4_zero_initial_lr():
    """α_0 = 0: θ_1 = θ_0, so α_2 = β‖g_1‖² (g includes weight decay, A-HD4); P1 gives 0.04."""
    model = make_model(F64)
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = metaopt.make_optimizer("sgd-hd", model.parameters(), lr=0.0, hypergrad_lr=0.01, weight_decay=0.1)
    run(model, opt, 1, fixed_batch=True)
    g1 = torch.cat([(p.grad + 0.1 * p).reshape(-1) for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta0))
    lrs = run(model, opt, 1, fixed_batch=True)
    assert lrs[0] == pytest.approx(0.01 * g1.dot(g1).item(), rel=1e-14)
    lrs, _, _, _ = quadratic("sgd-hd", [2.0], [1.0], 2, lr=0.0, hypergrad_lr=0.01)
    assert lrs == [0.0, exact(0.04)]


def _split_problem(seed=0):
    """A non-separable loss of a 23-coordinate vector: a tanh network whose weights are slices of it."""
    gen = torch.Generator().manual_seed(seed)
    theta0 = 0.5 * torch.randn(23, generator=gen, dtype=F64)
    x = torch.randn(10, 3, generator=gen, dtype=F64)
    y = torch.randn(10, 1, generator=gen, dtype=F64)

    def loss(flat):
        w1, b1, w2, b2 = flat[:12].reshape(4, 3), flat[12:16], flat[16:20].reshape(1, 4), flat[20:21]
        return torch.nn.functional.mse_loss(torch.tanh(x @ w1.T + b1) @ w2.T + b2, y) + 0.1 * flat[21:].pow(2).sum()

    return theta0, loss


@pytest.mark.parametrize("name,kw", [("sgd-hd", dict(lr=0.1, hypergrad_lr=0.05, weight_decay=0.01)),
                                     ("sgdn-hd", dict(lr=0.05, hypergrad_lr=0.01)),
                                     ("sgd-hd", dict(lr=0.05, hypergrad_lr=0.01, momentum=0.8, dampening=0.1)),
                                     ("adam-hd", dict(lr=0.05, hypergrad_lr=1e-3, weight_decay=0.01))])
def test_SGDHD_5_partition_invariance(name, kw):
    """One tensor, k tensors, or k tensors registered in a permuted order: the same α and θ trajectories (exact up to
    float64 summation order)."""
    theta0, loss = _split_problem()
    bounds = [(0, 12), (12, 16), (16, 20), (20, 21), (21, 23)]
    partitions = {"one": [(0, 23)], "split": bounds, "permuted": [bounds[i] for i in (3, 0, 4, 2, 1)]}
    results = {}
    for label, parts in partitions.items():
        params = [theta0[lo:hi].clone().requires_grad_() for lo, hi in parts]
        order = sorted(range(len(parts)), key=lambda i: parts[i][0])
        opt = metaopt.make_optimizer(name, params, **kw)
        lrs, thetas = [], []
        for _ in range(8):
            opt.zero_grad()
            loss(torch.cat([params[i] for i in order])).backward()
            opt.step()
            lrs.append(opt.param_groups[0]["lr"])
            thetas.append(torch.cat([params[i].detach() for i in order]))
        results[label] = (lrs, torch.stack(thetas))
    lrs_one, thetas_one = results["one"]
    assert lrs_one[-1] != lrs_one[0]  # the learning rate did adapt
    for label in ("split", "permuted"):
        lrs, thetas = results[label]
        assert lrs == pytest.approx(lrs_one, rel=1e-13, abs=0.0), label
        assert all(0 < lr < 1 for lr in lrs), lrs  # a well-behaved run, not a divergence
        torch.testing.assert_close(thetas, thetas_one, rtol=1e-13, atol=1e-15)


# -- SGDN-HD and heavy ball (spec §3) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,kw,torch_kw", [
    ("sgdn-hd", dict(lr=0.05), dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgdn-hd", dict(lr=0.05, momentum=0.8, weight_decay=0.01), dict(lr=0.05, momentum=0.8, nesterov=True,
                                                                    weight_decay=0.01)),
    ("sgd-hd", dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9)),  # heavy ball
    ("sgd-hd", dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3),
     dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3)),
], ids=["nesterov", "nesterov-wd", "heavy-ball", "heavy-ball-dampening-wd"])
def test_SGDN_1_zero_hypergrad_lr_is_torch_sgd_momentum_bit_for_bit(name, kw, torch_kw, dtype):
    ours, ref = make_model(dtype), make_model(dtype)
    lrs = run(ours, metaopt.make_optimizer(name, ours.parameters(), hypergrad_lr=0.0, **kw), 12)
    run(ref, torch.optim.SGD(ref.parameters(), foreach=False, **torch_kw), 12)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()
    assert all(lr == kw["lr"] for lr in lrs)


def test_SGDN_2_zero_momentum_is_sgd_hd():
    a, b = make_model(F64), make_model(F64)
    lrs_a = run(a, metaopt.make_optimizer("sgdn-hd", a.parameters(), lr=0.1, hypergrad_lr=0.05, momentum=0.0,
                                          nesterov=False), 10)
    lrs_b = run(b, metaopt.make_optimizer("sgd-hd", b.parameters(), lr=0.1, hypergrad_lr=0.05), 10)
    assert lrs_a == lrs_b and lrs_a[-1] != 0.1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # The Nesterov formula itself at μ = 0 (the face forbids nesterov without momentum; the rule does not).
    params = {"w": torch.tensor([1.0, -2.0], dtype=F64)}
    nesterov, plain = SGDHDRule(0.1, 0.05, momentum=0.0, nesterov=True), SGDHDRule(0.1, 0.05)
    sn, sp, pn, pp = nesterov.init(params), plain.init(params), params, params
    for _ in range(4):
        pn, sn = nesterov.step(pn, {"w": 3.0 * pn["w"]}, sn)
        pp, sp = plain.step(pp, {"w": 3.0 * pp["w"]}, sp)
        assert torch.equal(pn["w"], pp["w"]) and sn.lr == sp.lr


@pytest.mark.parametrize("beta,lr2,x2", [(0.01, 0.14712, 0.03505088), (1e-3, 0.104712, 0.203665088)])
def test_SGDN_3_P1_nesterov(beta, lr2, x2):
    lrs, xs, opt, (x,) = quadratic("sgdn-hd", [2.0], [1.0], 2, lr=0.1, hypergrad_lr=beta)
    assert xs[0][0].item() == exact(0.62)
    assert lrs == [0.1, exact(lr2)]
    assert xs[1][0].item() == pytest.approx(x2, rel=1e-14)
    assert opt.state[x]["prev_direction"].item() == exact(3.976)  # d_2 = a((1+μ)x_1 + μ²x_0)
    wrong = 0.1 + beta * (2.0 * 0.62) * (2.0 * 1.0)  # β·g_2·g_1 instead of β·g_2·d_1: 0.1248 at β = 0.01
    assert lrs[1] != pytest.approx(wrong, rel=1e-6)


def test_SGDN_4_P1_heavy_ball():
    lrs, xs, opt, (x,) = quadratic("sgd-hd", [2.0], [1.0], 3, lr=0.1, hypergrad_lr=0.01, momentum=0.9)
    assert lrs[:3] == [0.1, exact(0.132), exact(0.1558816)]
    assert xs[1][0].item() == exact(0.3512)
    # Heavy ball: d_prev is the momentum buffer itself (no extra memory).
    assert opt.state[x]["prev_direction"] is opt.state[x]["momentum_buffer"]
    # Plain SGD-HD keeps no momentum buffer.
    _, _, opt, (x,) = quadratic("sgd-hd", [2.0], [1.0], 2, lr=0.1, hypergrad_lr=0.01)
    assert opt.state[x]["momentum_buffer"].numel() == 0


def test_SGDN_5_zero_initial_lr():
    """α_0 = 0: α_2 = β(1+μ)‖g_1‖² (Nesterov's d_1 = (1+μ)g_1)."""
    model = make_model(F64)
    opt = metaopt.make_optimizer("sgdn-hd", model.parameters(), lr=0.0, hypergrad_lr=0.01)
    run(model, opt, 1, fixed_batch=True)
    g1 = flat_grad(model)
    lrs = run(model, opt, 1, fixed_batch=True)
    assert lrs[0] == pytest.approx(0.01 * 1.9 * g1.dot(g1).item(), rel=1e-14)
    lrs, _, _, _ = quadratic("sgdn-hd", [2.0], [1.0], 2, lr=0.0, hypergrad_lr=0.01)
    assert lrs == [0.0, exact(0.076)]


# -- Adam-HD (spec §4) -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)])
def test_ADAM_1_zero_hypergrad_lr_is_torch_adam_bit_for_bit(kw, dtype):
    ours, ref = make_model(dtype), make_model(dtype)
    lrs = run(ours, metaopt.make_optimizer("adam-hd", ours.parameters(), hypergrad_lr=0.0, **kw), 12)
    run(ref, torch.optim.Adam(ref.parameters(), foreach=False, fused=False, **kw), 12)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()
    assert all(type(lr) is float and lr == kw["lr"] for lr in lrs)


def test_ADAM_2_P1_closed_form():
    lrs, xs, _, _ = quadratic("adam-hd", [2.0], [1.0], 3, lr=0.1, hypergrad_lr=0.01, eps=0.0)
    assert xs[0][0].item() == exact(0.9)
    assert lrs == [0.1, exact(0.118), exact(0.13358521606138823)]
    assert xs[1][0].item() == exact(0.7824864286520722)
    assert lrs[1] != pytest.approx(0.136, rel=1e-3)  # what g_{t-1} instead of d_{t-1} would give


def test_ADAM_3_epsilon_placement():
    lrs, _, _, _ = quadratic("adam-hd", [2.0], [1.0], 2, lr=0.1, hypergrad_lr=0.01, eps=1e-3)
    assert lrs[1] == exact(0.11799200349850063)
    lrs, _, _, _ = quadratic("adam-hd", [2.0], [1.0], 2, lr=0.1, hypergrad_lr=0.01, eps=1e-3, gbaydin_compat=True)
    assert lrs[1] == exact(0.11775047097020871)


def test_ADAM_4_global_not_sequential():
    kw = dict(lr=0.1, hypergrad_lr=0.01, eps=0.0)
    lrs, xs, _, _ = quadratic("adam-hd", [2.0, 1.0], [1.0, 1.0], 2, **kw)
    assert lrs[1] == exact(0.127)
    assert [x.item() for x in xs[1]] == [exact(0.7735235291424845)] * 2
    # The reference code's sequential α: tensor 1 steps with 0.118, tensor 2 with 0.127; the logged lr is 0.127.
    lrs, xs, _, _ = quadratic("adam-hd", [2.0, 1.0], [1.0, 1.0], 2, gbaydin_compat=True, **kw)
    assert lrs[1] == exact(0.127)
    assert [x.item() for x in xs[1]] == [pytest.approx(0.7824864286520722, rel=1e-14),
                                         pytest.approx(0.7735235291424845, rel=1e-14)]


def test_ADAM_5_zero_initial_lr():
    """α_0 = 0, ε = 0: d_1 = sign(g_1), so α_2 = β‖g_1‖₁."""
    model = make_model(F64)
    opt = metaopt.make_optimizer("adam-hd", model.parameters(), lr=0.0, hypergrad_lr=1e-3, eps=0.0)
    run(model, opt, 1, fixed_batch=True)
    g1 = flat_grad(model)
    lrs = run(model, opt, 1, fixed_batch=True)
    assert lrs[0] == pytest.approx(1e-3 * g1.abs().sum().item(), rel=1e-14)
    lrs, _, _, _ = quadratic("adam-hd", [2.0], [1.0], 2, lr=0.0, hypergrad_lr=0.01, eps=0.0)
    assert lrs == [0.0, exact(0.02)]


# -- the face: resume, groups, hygiene, bad input, non-finite, negative α -------------------------------------------

FACES = [("sgd-hd", dict(lr=0.05, hypergrad_lr=0.01, weight_decay=1e-3)),
         ("sgdn-hd", dict(lr=0.05, hypergrad_lr=0.01)),
         ("sgd-hd", dict(lr=0.05, hypergrad_lr=0.01, momentum=0.9)),
         ("adam-hd", dict(lr=1e-2, hypergrad_lr=1e-4)),
         ("adam-hd", dict(lr=1e-2, hypergrad_lr=1e-4, gbaydin_compat=True))]
FACE_IDS = ["sgd-hd", "sgdn-hd", "heavy-ball", "adam-hd", "adam-hd-compat"]


@pytest.mark.parametrize("name,kw", FACES, ids=FACE_IDS)
def test_state_dict_resume_is_bit_exact(name, kw):
    straight = make_model(torch.float32)
    opt = metaopt.make_optimizer(name, straight.parameters(), **kw)
    lrs = run(straight, opt, 5, seed=1) + run(straight, opt, 5, seed=2)
    assert lrs[-1] != kw["lr"]

    resumed = make_model(torch.float32)
    opt1 = metaopt.make_optimizer(name, resumed.parameters(), **kw)
    run(resumed, opt1, 5, seed=1)
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = metaopt.make_optimizer(name, resumed.parameters(), **kw)
    opt2.load_state_dict(saved)
    lrs_resumed = run(resumed, opt2, 5, seed=2)
    assert lrs_resumed == lrs[5:]
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


IN_PLACE = FACES[:4] + [
    ("sgd-hd", dict(lr=0.05, hypergrad_lr=0.01, momentum=0.8, dampening=0.1, weight_decay=1e-3)),
    ("sgdn-hd", dict(lr=0.05, hypergrad_lr=0.01, weight_decay=1e-3)),
    ("adam-hd", dict(lr=1e-2, hypergrad_lr=1e-4, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
]


@pytest.mark.parametrize("name,kw", IN_PLACE, ids=FACE_IDS[:4] + ["heavy-ball-decay", "sgdn-hd-decay", "adam-hd-decay"])
def test_in_place_face_equals_the_rule_and_resumes_its_state(name, kw):
    """The default face steps in place with torch._foreach_* ops; fast=False steps through the rule. Same bits, same
    state, and each resumes the other's state_dict."""
    fast, slow = make_model(torch.float32), make_model(torch.float32)
    fast_opt = metaopt.make_optimizer(name, fast.parameters(), **kw)
    slow_opt = metaopt.make_optimizer(name, slow.parameters(), fast=False, **kw)
    assert run(fast, fast_opt, 5) == run(slow, slow_opt, 5)
    a, b = assert_same_parameters_and_state(fast, fast_opt, slow, slow_opt)
    fast_opt.load_state_dict(b)
    slow_opt.load_state_dict(a)
    assert run(fast, fast_opt, 4, seed=2) == run(slow, slow_opt, 4, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(fast.parameters(), slow.parameters()))


@pytest.mark.parametrize("name,kw", IN_PLACE[:4], ids=FACE_IDS[:4])
def test_in_place_face_screens_nonfinite_gradients_through_h(name, kw):
    """The in-place step notices a NaN / inf gradient from h (no separate pass): on the first step (before any state
    exists: none is created) and on a later one it skips, or raises with nonfinite="raise", and writes nothing."""
    model = make_model(F64)
    opt = metaopt.make_optimizer(name, model.parameters(), **kw)
    assert_nonfinite_step_is_skipped(model, opt)
    assert not any(opt.state.values()) and opt.param_groups[0]["lr"] == kw["lr"]
    run(model, opt, 3)
    state_before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    for skipped, bad in enumerate((float("inf"), -float("inf"), float("nan")), start=2):
        list(model.parameters())[-1].grad.view(-1)[-1] = bad
        opt.step()
        assert opt.param_groups[0]["nonfinite_skipped"] == skipped
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    assert all(torch.equal(after["state"][i][k], v) for i, st in state_before["state"].items() for k, v in st.items())
    raising = metaopt.make_optimizer(name, model.parameters(), nonfinite="raise", **kw)
    raising.load_state_dict(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        raising.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert raising.param_groups[0]["lr"] == state_before["param_groups"][0]["lr"]


COMPILED = [IN_PLACE[4], IN_PLACE[5], IN_PLACE[6]]


@pytest.mark.parametrize("name,kw", COMPILED, ids=["heavy-ball-decay", "sgdn-hd-decay", "adam-hd-decay"])
def test_compiled_face_equals_the_rule_within_float32_rounding(name, kw):
    """compile=True fuses the reduction and the update (torch.compile, inductor): the rule's trajectory within float32
    rounding, the same state layout (the rule resumes it), and non-finite gradients still screened through h."""
    fast, slow = make_model(torch.float32), make_model(torch.float32)
    fast_opt = metaopt.make_optimizer(name, fast.parameters(), compile=True, **kw)
    slow_opt = metaopt.make_optimizer(name, slow.parameters(), fast=False, **kw)
    lrs_fast, lrs_slow = run(fast, fast_opt, 6), run(slow, slow_opt, 6)
    assert lrs_fast == pytest.approx(lrs_slow, rel=1e-5)
    for p, q in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    a, b = fast_opt.state_dict(), slow_opt.state_dict()
    assert a["state"].keys() == b["state"].keys() and all(a["state"][i].keys() == b["state"][i].keys() for i in a["state"])
    slow_opt.load_state_dict(a)
    params = [p.detach().clone() for p in fast.parameters()]
    list(fast.parameters())[0].grad.view(-1)[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        fast_opt.step()
    assert fast_opt.param_groups[0]["nonfinite_skipped"] == 1
    assert all(torch.equal(p, q) for p, q in zip(fast.parameters(), params))


@pytest.mark.parametrize("kw,match", [(dict(compile=1), "compile"), (dict(compile=True, fast=False), "fast=True"),
                                      (dict(compile=True, gbaydin_compat=True), "gbaydin_compat")])
def test_invalid_compile_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        metaopt.make_optimizer("adam-hd", [torch.zeros(1, requires_grad=True)], **kw)


def test_each_param_group_has_its_own_global_lr():
    """Two groups behave as two independent HD optimizers (one global α per group)."""
    model, ref = make_model(F64), make_model(F64)
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}]
    opt = metaopt.make_optimizer("sgd-hd", groups, lr=0.05, hypergrad_lr=0.02)
    opt_a = metaopt.make_optimizer("sgd-hd", ref[0].parameters(), lr=0.1, hypergrad_lr=0.02)
    opt_b = metaopt.make_optimizer("sgd-hd", ref[2].parameters(), lr=0.05, hypergrad_lr=0.02)
    gen = torch.Generator().manual_seed(3)
    for _ in range(6):
        x, y = torch.randn(16, 5, generator=gen, dtype=F64), torch.randn(16, 3, generator=gen, dtype=F64)
        for m in (model, ref):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()
        opt_a.step()
        opt_b.step()
    assert opt.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] != 0.1
    assert opt.param_groups[1]["lr"] == opt_b.param_groups[0]["lr"] != 0.05
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("name,kw", FACES[:1] + FACES[3:4], ids=["sgd-hd", "adam-hd"])
def test_gradients_are_not_modified_and_not_aliased(name, kw):
    """The step never changes p.grad, and d_prev does not alias it: zeroing grads in place is harmless."""
    a, b = make_model(F64), make_model(F64)
    opt_a = metaopt.make_optimizer(name, a.parameters(), **kw)
    lrs_a = run(a, opt_a, 6, zero_grad_to_none=True)
    lrs_b = run(b, metaopt.make_optimizer(name, b.parameters(), **kw), 6, zero_grad_to_none=False)
    assert lrs_a == lrs_b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    grads = [p.grad.clone() for p in a.parameters()]
    opt_a.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), grads))


@pytest.mark.parametrize("name,kw,match", [
    ("sgd-hd", dict(lr=-1e-3), "learning rate"),
    ("sgd-hd", dict(hypergrad_lr=-1e-3), "hypergrad_lr"),
    ("sgdn-hd", dict(hypergrad_lr=-1.0), "hypergrad_lr"),
    ("sgdn-hd", dict(momentum=0.0), "nesterov"),
    ("sgd-hd", dict(momentum=-0.5), "momentum"),
    ("sgd-hd", dict(dampening=1.5), "dampening"),
    ("adam-hd", dict(lr=-1.0), "learning rate"),
    ("adam-hd", dict(hypergrad_lr=-1e-7), "hypergrad_lr"),
    ("adam-hd", dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    ("adam-hd", dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    ("adam-hd", dict(betas=(0.9,)), "betas"),
    ("adam-hd", dict(eps=-1e-8), "epsilon"),
    ("adam-hd", dict(nonfinite="ignore"), "nonfinite"),
])
def test_invalid_hyperparameters_name_the_argument(name, kw, match):
    with pytest.raises(ValueError, match=match):
        metaopt.make_optimizer(name, [torch.zeros(1, requires_grad=True)], **kw)


def test_defaults_are_the_papers():
    p = [torch.zeros(1, requires_grad=True)]
    for name, lr, beta, extra in (("sgd-hd", 1e-3, 1e-3, dict(momentum=0.0, nesterov=False)),
                                  ("sgdn-hd", 1e-3, 1e-3, dict(momentum=0.9, nesterov=True)),
                                  ("adam-hd", 1e-3, 1e-7, dict(betas=(0.9, 0.999), eps=1e-8))):
        group = metaopt.make_optimizer(name, p).param_groups[0]
        assert (group["lr"], group["hypergrad_lr"]) == (lr, beta)
        assert group["clip_lr_at_zero"] is False and group["gbaydin_compat"] is False
        assert group["weight_decay"] == 0.0 and group["negative_lr_steps"] == 0
        assert all(group[k] == v for k, v in extra.items())


@pytest.mark.parametrize("name,kw", FACES, ids=FACE_IDS)
def test_nonfinite_gradient_is_skipped_and_counted(name, kw):
    model = make_model(F64)
    opt = metaopt.make_optimizer(name, model.parameters(), **kw)
    run(model, opt, 3)
    state_before, after = assert_nonfinite_step_is_skipped(model, opt)
    assert after["param_groups"][0]["lr"] == state_before["param_groups"][0]["lr"]


def test_overflowing_hypergradient_is_skipped_or_raises():
    """Finite gradients whose float64 dot product overflows give a non-finite α: skipped (counted) or raised."""
    for mode in ("skip", "raise"):
        x = torch.tensor([1.0], dtype=F64, requires_grad=True)
        opt = metaopt.make_optimizer("sgd-hd", [x], lr=1e-300, hypergrad_lr=1.0, nonfinite=mode)
        x.grad = torch.tensor([1e200], dtype=F64)
        opt.step()  # h_1 = 0
        before = (x.detach().clone(), opt.param_groups[0]["lr"])
        if mode == "raise":
            with pytest.raises(FloatingPointError, match="non-finite learning rate"):
                opt.step()
        else:
            with pytest.warns(RuntimeWarning, match="non-finite learning rate"):
                opt.step()
            assert opt.param_groups[0]["nonfinite_skipped"] == 1
        assert torch.equal(x.detach(), before[0]) and opt.param_groups[0]["lr"] == before[1]
        assert opt.param_groups[0]["step"] == 1


def test_negative_lr_is_kept_counted_and_logged_once(caplog):
    """P1 with α_0 = 0.6, β = 1: h_2 = 0.8, so α_2 = −0.2 (A-HD3: kept by default, clipped on request)."""
    with caplog.at_level(logging.WARNING, logger="metaopt.hypergrad.hd"):
        lrs, xs, opt, _ = quadratic("sgd-hd", [2.0], [1.0], 3, lr=0.6, hypergrad_lr=1.0)
    assert lrs[:2] == [0.6, exact(-0.2)]
    assert xs[1][0].item() == exact(-0.28)
    negatives = sum(lr < 0 for lr in lrs)
    assert opt.param_groups[0]["negative_lr_steps"] == negatives >= 1
    assert len([r for r in caplog.records if "negative" in r.getMessage()]) == 1

    lrs, xs, opt, _ = quadratic("sgd-hd", [2.0], [1.0], 3, lr=0.6, hypergrad_lr=1.0, clip_lr_at_zero=True)
    assert lrs == [0.6, 0.0, exact(0.16)]  # α_3 = 0 + β·g_3·d_2 = 0.4·0.4
    assert xs[1][0].item() == exact(-0.2)
    assert opt.param_groups[0]["negative_lr_steps"] == 1

    # Alternating gradients drive α negative at every step after the first: counted each time, logged once.
    caplog.clear()
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("sgd-hd", [x], lr=0.0, hypergrad_lr=1.0, clip_lr_at_zero=True)
    with caplog.at_level(logging.WARNING, logger="metaopt.hypergrad.hd"):
        for sign in (1, -1, 1, -1, 1):
            x.grad = torch.tensor([float(sign)], dtype=F64)
            opt.step()
    assert opt.param_groups[0]["negative_lr_steps"] == 4 and opt.param_groups[0]["lr"] == 0.0
    assert len([r for r in caplog.records if "negative" in r.getMessage()]) == 1


# -- the functional core ----------------------------------------------------------------------------------------------

A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 2.0]], dtype=F64)


def _core_loss(rule_fn, lr, beta, steps=6):
    """Run a rule on f = ½ xᵀAx (x split into two tensors) with gradients that are functions of x; return f(x_T)."""
    rule = rule_fn(lr, beta)
    params = {"a": torch.tensor([1.0, -0.5], dtype=F64), "b": torch.tensor([0.8], dtype=F64)}
    state = rule.init(params)
    for _ in range(steps):
        x = torch.cat([params["a"], params["b"]])
        g = A @ x
        params, state = rule.step(params, {"a": g[:2], "b": g[2:]}, state)
    x = torch.cat([params["a"], params["b"]])
    return 0.5 * x @ A @ x, state


RULES = {
    "sgd-hd": lambda lr, beta: SGDHDRule(lr, beta, weight_decay=0.01),
    "sgdn-hd": lambda lr, beta: SGDHDRule(lr, beta, momentum=0.9, nesterov=True),
    "heavy-ball": lambda lr, beta: SGDHDRule(lr, beta, momentum=0.9, dampening=0.1),
    "adam-hd": lambda lr, beta: AdamHDRule(lr, beta, weight_decay=0.01),
    "adam-hd-compat": lambda lr, beta: AdamHDRule(lr, beta, eps=1e-3, gbaydin_compat=True),
}


@pytest.mark.parametrize("kind", list(RULES))
def test_functional_core_derivative_matches_finite_differences(kind):
    """d f(x_T) / d hypergrad_lr (tensor) and d f(x_T) / d α_0 (tensor) by autograd == central differences."""
    lr0, beta0 = (0.05, 0.02) if kind.startswith("adam") else (0.1, 0.05)
    beta = torch.tensor(beta0, dtype=F64, requires_grad=True)
    lr = torch.tensor(lr0, dtype=F64, requires_grad=True)
    loss, state = _core_loss(RULES[kind], lr, beta)
    assert isinstance(state.lr, torch.Tensor) and state.lr.requires_grad  # a tensor α stays a differentiable tensor
    dbeta, dlr = torch.autograd.grad(loss, (beta, lr))
    eps = 1e-6
    rule_fn = RULES[kind]
    with torch.no_grad():
        fd_beta = (_core_loss(rule_fn, lr0, beta0 + eps)[0] - _core_loss(rule_fn, lr0, beta0 - eps)[0]) / (2 * eps)
        fd_lr = (_core_loss(rule_fn, lr0 + eps, beta0)[0] - _core_loss(rule_fn, lr0 - eps, beta0)[0]) / (2 * eps)
    assert dbeta.item() != 0.0
    assert dbeta.item() == pytest.approx(fd_beta.item(), rel=1e-6, abs=1e-10)
    assert dlr.item() == pytest.approx(fd_lr.item(), rel=1e-6, abs=1e-10)


def test_functional_core_is_pure_and_float_mode_matches_the_face():
    """Inputs are never mutated, and a Python-float α stays a float in the rule, equal to the face's trajectory."""
    params = {"a": torch.tensor([1.0, -0.5], dtype=F64), "b": torch.tensor([0.8], dtype=F64)}
    rule = SGDHDRule(0.1, 0.05, momentum=0.9, nesterov=True)
    state = rule.init(params)
    face_params = [params["a"].clone().requires_grad_(), params["b"].clone().requires_grad_()]
    opt = metaopt.make_optimizer("sgdn-hd", face_params, lr=0.1, hypergrad_lr=0.05)
    for _ in range(5):
        x = torch.cat([params["a"], params["b"]])
        g = A @ x
        grads = {"a": g[:2].clone(), "b": g[2:].clone()}
        before = {k: (v.clone(), grads[k].clone()) for k, v in params.items()}
        new, state = rule.step(params, grads, state)
        assert all(torch.equal(params[k], v) and torch.equal(grads[k], gv) for k, (v, gv) in before.items())
        face_params[0].grad, face_params[1].grad = grads["a"], grads["b"]
        opt.step()
        params = new
        assert type(state.lr) is float and state.lr == opt.param_groups[0]["lr"]
    assert torch.equal(face_params[0].detach(), params["a"]) and torch.equal(face_params[1].detach(), params["b"])


def test_shared_pieces():
    """global_hypergradient = −Σ⟨g, d⟩ in float64 (missing names contribute 0); adam_hypergradient uses d_{t−1} from
    (m, v); update_learning_rate is α − β·h with the clip and the negative flag."""
    g = {"a": torch.tensor([1.0, 2.0], dtype=torch.float32), "b": torch.tensor([3.0], dtype=torch.float32)}
    d = {"a": torch.tensor([0.5, -1.0], dtype=torch.float32)}
    h = global_hypergradient(g, d)
    assert h.dtype == F64 and h.item() == 1.5
    assert global_hypergradient(g, {}).item() == 0.0
    m, v = {"a": torch.tensor([0.1, -0.2]), "b": torch.tensor([0.3])}, {"a": torch.tensor([0.01, 0.04]),
                                                                         "b": torch.tensor([0.09])}
    # Step 1 moments (m = 0.1 g, v = 0.001 g² with ε = 0) give d_1 = sign(g_1).
    hs = adam_hypergradient(g, m, {k: t / 10 for k, t in v.items()}, 1, 0.9, 0.999, 0.0)
    assert hs.item() == pytest.approx(-(1.0 - 2.0 + 3.0), rel=1e-6)
    assert adam_hypergradient(g, m, v, 0, 0.9, 0.999, 1e-8).item() == 0.0
    assert update_learning_rate(0.1, 0.01, torch.tensor(-2.0, dtype=F64)) == (0.1 - 0.01 * -2.0, False)
    assert update_learning_rate(0.1, 0.01, torch.tensor(20.0, dtype=F64)) == (0.1 - 0.01 * 20.0, True)
    assert update_learning_rate(0.1, 0.01, torch.tensor(20.0, dtype=F64), clip_lr_at_zero=True) == (0.0, True)
    lr_t, neg = update_learning_rate(torch.tensor(0.1, dtype=torch.float32), 0.01, torch.tensor(20.0, dtype=F64), True)
    assert lr_t.dtype == torch.float32 and lr_t.item() == 0.0 and bool(neg)
