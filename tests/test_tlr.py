"""Trainable Learning Rate (tlr, tlr-pl, tlr-naive): every oracle T-1..T-7 of specs/hypergradient.md §7, the window
rules (A-T4..A-T8), the NTLR-compatible variant against a re-statement of the public code, exact resume (also
mid-window), non-finite handling, argument errors, LR-scheduler guards and finite-difference checks of the functional
cores' derivatives."""

import copy
import logging
import math

import pytest
import torch
from helpers import assert_nonfinite_step_is_skipped, assert_same_parameters_and_state

import metaopt
import metaopt.hypergrad.hd  # noqa: F401  (registers sgd-hd, the T-6 reference)
import metaopt.hypergrad.tlr  # noqa: F401  (registers tlr, tlr-pl, tlr-naive)
from metaopt.hypergrad.tlr import NaiveTLRRule, TLRRule, newton_ratio, ntlr_factor

F64 = torch.float64

# T-1: alpha_0..alpha_14 of efficient TLR on P1 (a = 2, x0 = 1, alpha0 = 0.1, c = 1/4).
T1 = [0.1, 0.1, 0.125, 0.15625, 0.1953125, 0.244140625, 0.30517578125, 0.3814697265625, 0.476837158203125,
      0.59604644775390625, 0.47104644775390625, 0.58880805969238, 0.46380805969238, 0.57976007461548,
      0.45476007461548]
# T-4: the second tensor (a = 5) of the separable model, alpha_0..alpha_8.
T4_A5 = [0.1, 0.1, 0.125, 0.15625, 0.1953125, 0.244140625, 0.194140625, 0.24267578125, 0.19267578125]
# T-5: windowed with K = 1 on P1, alpha^(0)..alpha^(14) (the lagged recursion).
T5 = [0.1, 0.1, 0.125, 0.15625, 0.1953125, 0.244140625, 0.30517578125, 0.3814697265625, 0.476837158203125,
      0.59604645, 0.74505806, 0.58880806, 0.49002246, 0.38599398, 0.48249247]


# -- harnesses ---------------------------------------------------------------------------------------------------------


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def batches(dtype, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype))
            for _ in range(steps)]


def run(model, opt, data, after_step=None):
    """Minibatch MSE regression with backward() + step(); returns the lr after each step."""
    lrs = []
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        if after_step is not None:
            after_step(i)
    return lrs


def run_closure(model, opt, data):
    """The same regression with step(closure) (tlr-naive)."""
    losses = []
    for x, y in data:
        losses.append(opt.step(lambda: torch.nn.functional.mse_loss(model(x), y)))
    return losses


def quadratic(name, a, x0, steps, **kw):
    """f = ½ Σ a_i x_i², one scalar tensor per entry (P1: a = (2,), x0 = (1,)); returns lr history, params, opt."""
    params = [torch.tensor([v], dtype=F64, requires_grad=True) for v in x0]
    opt = metaopt.make_optimizer(name, params, **kw)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        for p, c in zip(params, a):
            p.grad = c * p.detach()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs, params, opt


def p1_closure(x, log=None):
    def closure():
        if log is not None:
            log.append(x.detach().clone())
        return (0.5 * 2.0 * x**2).sum()
    return closure


def close(value, rel=1e-13):
    return pytest.approx(value, rel=rel, abs=0.0)


# -- T-1, T-2: efficient TLR (Alg. 2, eq. 9) ---------------------------------------------------------------------------


def test_T1_efficient_tlr_P1_sequence():
    lrs, (x,), opt = quadratic("tlr", [2.0], [1.0], 14, lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.0  # Alg. 2 exactly
    assert lrs == [close(v) for v in T1]
    # The closed form behind the numbers: x1.25 while alpha*a < 1, minus 1/(4a) once alpha*a > 1.
    for prev, new in zip(lrs[1:], lrs[2:]):
        assert new == close(1.25 * prev if prev * 2.0 < 1 else prev - 1 / 8, rel=1e-12)


def test_T1_first_step_keeps_lr_and_new_lr_applies_to_current_gradient():
    """alpha_1 = alpha_0 on any data, and w_{t+1} = w_t - alpha_{t+1} g_t (no lag, Alg. 2)."""
    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr", model.parameters(), lr=0.05)
    data = batches(F64, 3)
    lrs = run(model, opt, data[:1])
    assert lrs == [0.05]
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data[1]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    lr = opt.param_groups[0]["lr"]
    assert lr != 0.05
    for p, w, g in zip(model.parameters(), before, grads):
        assert torch.equal(p, torch.add(w, g, alpha=-lr))


@pytest.mark.parametrize("g,factor", [((1.0, 2.0), 1.0625), ((-1.0, 0.0), 0.875), ((2.0, 0.0), 1.25),
                                      ((1.0, 0.0), 1.25), ((0.0, 0.0), 1.0)])
def test_T2_rule_table(g, factor):
    """c = 1/4, g_prev = (1, 0): the factor alpha_{t+1}/alpha_t, through eq. 9 and through the functional core."""
    g = torch.tensor(g, dtype=F64)
    prev = torch.tensor([1.0, 0.0], dtype=F64)
    assert 1 + newton_ratio(float(g @ prev), float(g @ g), 0.25) == factor
    rule = TLRRule(lr=0.1, bound=0.25, momentum=0.0, weight_decay=0.0)
    params = {"w": torch.zeros(2, dtype=F64)}
    state = rule.init(params)._replace(step=1, prev_direction={"w": prev})
    new_params, new_state = rule.step(params, {"w": g}, state)
    assert new_state.lr / 0.1 == close(factor, rel=1e-15)
    assert torch.equal(new_params["w"], torch.add(params["w"], g, alpha=-new_state.lr))
    assert torch.equal(new_state.prev_direction["w"], g)


def test_T2_factor_bounds_and_alg2_equivalence():
    """Random vectors: the factor lies in (3/4, 1 + c], and eq. 9 equals Alg. 2's min(a / max(D, 0), c) (A-T1)."""
    gen = torch.Generator().manual_seed(0)
    for i in range(500):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        g, prev = torch.randn(n, generator=gen, dtype=F64), torch.randn(n, generator=gen, dtype=F64)
        if i % 5 == 0:
            g = prev * float(torch.randn(1, generator=gen, dtype=F64))  # (anti-)parallel pairs: D <= 0 happens
        c = float(torch.rand(1, generator=gen, dtype=F64)) * 2 + 0.01
        a, sq = float(g @ prev), float(g @ g)
        r = newton_ratio(a, sq, c)
        assert 0.75 < 1 + r <= 1 + c * (1 + 1e-15)
        den = max(4 * (sq - a), 0.0)
        alg2 = min(a / den if den > 0 else math.inf, c)
        assert r == pytest.approx(alg2, rel=1e-14, abs=1e-300)
        r_tensor = newton_ratio(torch.tensor(a, dtype=F64), torch.tensor(sq, dtype=F64), c)
        assert float(r_tensor) == pytest.approx(r, rel=1e-15, abs=0.0)


# -- T-3: naive TLR (Alg. 1) -------------------------------------------------------------------------------------------


def test_T3_naive_P1_two_evaluations_per_step():
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("tlr-naive", [x], lr=0.1, eta=0.01)
    points = []
    lrs = []
    for step in range(2):
        before = len(points)
        loss = opt.step(p1_closure(x, points))
        assert len(points) - before == 2  # exactly two gradient evaluations per step
        assert opt.param_groups[0]["grad_evals"] == 2 * (step + 1)
        lrs.append(opt.param_groups[0]["lr"])
        assert float(loss) == close(float(points[before]) ** 2, rel=1e-15)  # the loss at w_t is returned
    assert lrs == [close(0.132, rel=1e-15), close(0.14794753024, rel=1e-15)]
    # The lookahead point is w_t - alpha_t g_t, and the step uses the new alpha: w_{t+1} = w_t - alpha_{t+1} g_t.
    assert float(points[0]) == 1.0 and float(points[1]) == close(0.8, rel=1e-15)
    assert float(points[2]) == close(0.736, rel=1e-15) and float(points[3]) == close(0.541696, rel=1e-15)
    assert float(x.detach()) == close(0.736 - 0.14794753024 * 2 * 0.736, rel=1e-15)


def test_T3_naive_same_batch_and_closure_that_calls_backward():
    """Both evaluations of a step see the step's batch; a closure that runs backward() itself gives the same run."""
    data = batches(F64, 6)
    model_a, model_b = make_model(F64), make_model(F64)
    opt_a = metaopt.make_optimizer("tlr-naive", model_a.parameters(), lr=0.05, eta=0.1)
    opt_b = metaopt.make_optimizer("tlr-naive", model_b.parameters(), lr=0.05, eta=0.1)
    seen = []
    for i, (x, y) in enumerate(data):
        def pure():
            seen.append(i)
            return torch.nn.functional.mse_loss(model_a(x), y)

        def with_backward():
            opt_b.zero_grad()
            loss = torch.nn.functional.mse_loss(model_b(x), y)
            loss.backward()
            return loss

        la, lb = opt_a.step(pure), opt_b.step(with_backward)
        assert float(la.detach()) == float(lb.detach())
    assert seen == [i for i in range(len(data)) for _ in range(2)]
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] != 0.05
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_T3_naive_one_closure_pair_for_all_groups():
    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr-naive", [{"params": model[0].parameters(), "lr": 0.1},
                                               {"params": model[2].parameters()}], lr=0.02, eta=0.1)
    calls = []
    for x, y in batches(F64, 3):
        opt.step(lambda: calls.append(1) or torch.nn.functional.mse_loss(model(x), y))
    assert len(calls) == 6
    assert [g["grad_evals"] for g in opt.param_groups] == [6, 6]
    assert opt.param_groups[0]["lr"] != opt.param_groups[1]["lr"]


def test_naive_negative_lr_is_kept_counted_logged_or_clipped(caplog):
    """alpha_1 = 0.9 + 1 * <g_hat, g> = 0.9 + 4 (1 - 1.8) = -2.3 on P1: kept by default (Alg. 1), or clipped."""
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("tlr-naive", [x], lr=0.9, eta=1.0)
    with caplog.at_level(logging.WARNING, logger="metaopt.hypergrad.tlr"):
        opt.step(p1_closure(x))
    assert opt.param_groups[0]["lr"] == close(-2.3, rel=1e-15)
    assert opt.param_groups[0]["negative_lr_steps"] == 1
    assert "negative" in caplog.text
    x2 = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt2 = metaopt.make_optimizer("tlr-naive", [x2], lr=0.9, eta=1.0, clip_lr_at_zero=True)
    opt2.step(p1_closure(x2))
    assert opt2.param_groups[0]["lr"] == 0.0 and float(x2.detach()) == 1.0
    assert opt2.param_groups[0]["negative_lr_steps"] == 1


def test_naive_requires_a_closure_returning_a_graph():
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("tlr-naive", [x])
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="graph"):
        opt.step(lambda: (x**2).sum().detach())
    assert float(x.detach()) == 1.0


# -- T-4: per tensor ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(window=3), dict(window=2, ntlr_compat=True)])
def test_T4_single_tensor_model_equals_global(kw):
    torch.manual_seed(0)
    global_model = torch.nn.Linear(5, 3, bias=False).to(F64)
    per_tensor_model = copy.deepcopy(global_model)
    data = batches(F64, 10)
    opt_g = metaopt.make_optimizer("tlr", global_model.parameters(), lr=0.1, **kw)
    opt_pl = metaopt.make_optimizer("tlr-pl", per_tensor_model.parameters(), lr=0.1, **kw)
    run(global_model, opt_g, data)
    run(per_tensor_model, opt_pl, data)
    assert torch.equal(global_model.weight, per_tensor_model.weight)
    assert opt_pl.state[per_tensor_model.weight]["lr"] == opt_g.param_groups[0]["lr"] != 0.1
    assert opt_pl.param_groups[0]["lr"] == 0.1  # only the initial value


def test_T4_separable_per_tensor_lrs():
    params = [torch.tensor([1.0], dtype=F64, requires_grad=True) for _ in range(2)]
    opt = metaopt.make_optimizer("tlr-pl", params, lr=0.1)
    hist = [[0.1], [0.1]]
    for _ in range(14):
        for p, a in zip(params, (2.0, 5.0)):
            p.grad = a * p.detach()
        opt.step()
        for h, p in zip(hist, params):
            h.append(opt.state[p]["lr"])
    assert hist[0] == [close(v) for v in T1]
    assert hist[1][:len(T4_A5)] == [close(v) for v in T4_A5]
    assert opt.learning_rates(opt.param_groups[0]) == {"0": hist[0][-1], "1": hist[1][-1]}


# -- T-5 and the window rules (A-T4..A-T8) -----------------------------------------------------------------------------


def test_T5_windowed_K1_P1_lagged_recursion():
    lrs, _, opt = quadratic("tlr", [2.0], [1.0], 14, lr=0.1, window=1, momentum=0.0, weight_decay=0.0)
    assert lrs == [pytest.approx(v, rel=0, abs=5e-9) for v in T5]
    assert lrs[:9] == [close(v) for v in T5[:9]]
    # The lag (A-T8): the efficient rule and the K = 1 window rule agree until alpha*a first exceeds 1.
    assert lrs[:10] == [close(v) for v in T1[:10]] and lrs[10] != close(T1[10])


def test_T5_windowed_alpha_changes_only_at_multiples_of_K():
    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr", model.parameters(), lr=0.05, window=3)
    assert (opt.param_groups[0]["momentum"], opt.param_groups[0]["weight_decay"]) == (0.8, 5e-4)  # App. D base
    lrs = run(model, opt, batches(F64, 13))
    for step, (prev, new) in enumerate(zip([0.05] + lrs, lrs), start=1):
        if step % 3 != 0 or step == 3:  # inside a window, or the first boundary (G_0 = 0 gives r = 0)
            assert new == prev, step
        else:
            assert new != prev, step
    assert opt.param_groups[0]["boundaries"] == 4


@pytest.mark.parametrize("window,n,compat,k", [(0.33, 10, False, 3), (0.05, 10, False, 1), (1.0, 7, False, 7),
                                               (0.33, 100, False, 33), (0.05, 10, True, 0), (0.5, 9, True, 4)])
def test_A_T5_window_fraction_of_an_epoch(window, n, compat, k):
    opt = metaopt.make_optimizer("tlr", [torch.zeros(1, requires_grad=True)], window=window, steps_per_epoch=n,
                                 ntlr_compat=compat)
    assert opt.param_groups[0]["window_steps"] == k


def test_A_T6_windows_run_torch_sgd_and_update_alpha_by_eq_10():
    """Between boundaries the trajectory is torch.optim.SGD(momentum 0.8, weight decay 5e-4) bit for bit; at each
    boundary alpha^(j+1) = alpha^(j) (1 + r(G_j, G_{j-1})) with G_j = (w_start - w_now) / alpha^(j) (eq. 10)."""
    k, c = 4, 0.25
    ours, ref = make_model(torch.float32), make_model(torch.float32)
    opt = metaopt.make_optimizer("tlr", ours.parameters(), lr=0.05, window=k)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.8, weight_decay=5e-4, foreach=False)
    start = [p.detach().clone() for p in ref.parameters()]
    prev_dir = None
    for step, (x, y) in enumerate(batches(torch.float32, 17), start=1):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(p, q), step
        alpha = ref_opt.param_groups[0]["lr"]
        if step % k:
            assert opt.param_groups[0]["lr"] == alpha
            continue
        direction = [(s - p.detach()).double() / alpha for s, p in zip(start, ref.parameters())]
        a = sum(float((d * e).sum()) for d, e in zip(direction, prev_dir)) if prev_dir else 0.0
        sq = sum(float((d * d).sum()) for d in direction)
        expected = alpha * (1 + a / max(4 * (sq - a), a / c))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)
        if step > k:
            assert opt.param_groups[0]["lr"] != alpha
        ref_opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
        start, prev_dir = [p.detach().clone() for p in ref.parameters()], direction


def test_every_step_mode_with_momentum_uses_the_momentum_direction():
    """P1, momentum 0.8: d_1 = 2, alpha_1 = 0.1, x_1 = 0.8; d_2 = 0.8 * 2 + 1.6 = 3.2, a = 6.4, r = c,
    alpha_2 = 0.125, x_2 = 0.8 - 0.125 * 3.2 = 0.4."""
    lrs, (x,), _ = quadratic("tlr", [2.0], [1.0], 2, lr=0.1, momentum=0.8)
    assert lrs == [0.1, 0.1, close(0.125, rel=1e-15)]
    assert float(x.detach()) == close(0.4, rel=1e-14)


# -- T-6: fixed eta is SGD-HD with the clip at 0 -----------------------------------------------------------------------


@pytest.mark.parametrize("lr,eta", [(0.1, 0.01), (0.9, 0.5)])
def test_T6_fixed_eta_equals_sgd_hd_clipped_P1(lr, eta):
    ours, (x,), opt = quadratic("tlr", [2.0], [1.0], 12, lr=lr, eta=eta)
    ref, (y,), ref_opt = quadratic("sgd-hd", [2.0], [1.0], 12, lr=lr, hypergrad_lr=eta, clip_lr_at_zero=True)
    assert ours == ref  # one scalar: the same arithmetic, bit for bit
    assert torch.equal(x, y)
    assert opt.param_groups[0]["negative_lr_steps"] == ref_opt.param_groups[0]["negative_lr_steps"]
    if lr == 0.9:
        assert 0.0 in ours and opt.param_groups[0]["negative_lr_steps"] > 0  # the clip was exercised


def test_T6_fixed_eta_equals_sgd_hd_clipped_mlp():
    data = batches(F64, 15)
    ours, ref = make_model(F64), make_model(F64)
    opt = metaopt.make_optimizer("tlr", ours.parameters(), lr=0.3, eta=2.0)
    ref_opt = metaopt.make_optimizer("sgd-hd", ref.parameters(), lr=0.3, hypergrad_lr=2.0, clip_lr_at_zero=True)
    lrs, ref_lrs = run(ours, opt, data), run(ref, ref_opt, data)
    assert lrs == [pytest.approx(v, rel=1e-12, abs=1e-15) for v in ref_lrs]
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-13)
    assert opt.param_groups[0]["negative_lr_steps"] == ref_opt.param_groups[0]["negative_lr_steps"] > 0


# -- T-7: alpha_0 = 0 stays 0 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tlr", "tlr-pl"])
@pytest.mark.parametrize("kw", [dict(), dict(window=1), dict(window=3)])
def test_T7_zero_lr_stays_zero(name, kw):
    model = make_model(F64)
    before = [p.detach().clone() for p in model.parameters()]
    opt = metaopt.make_optimizer(name, model.parameters(), lr=0.0, **kw)
    lrs = run(model, opt, batches(F64, 7))
    assert lrs == [0.0] * 7
    if name == "tlr-pl":
        assert all(opt.state[p]["lr"] == 0.0 for p in model.parameters())
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    # Unlike SGD-HD, whose alpha_2 = beta ||g_1||^2 (SGDHD-4).
    _, _, hd = quadratic("sgd-hd", [2.0], [1.0], 2, lr=0.0, hypergrad_lr=0.01)
    assert hd.param_groups[0]["lr"] == close(0.04, rel=1e-15)


# -- NTLR-compatible variant (spec §7 "Variant in the public code", A-T3) ---------------------------------------------


class NTLRReference:
    """The public NTLR code's tlr_wrapper.TLR (georgeretsi/NTLR, HEAD d2d279e) restated over torch.optim.SGD: a step
    counter that triggers an update when it equals K (before its increment), a cache of (w, G) per parameter set up at
    the first update, and lr *= 1 + gamma * <G_old, G_new> / (||G_old||^2 - <G_old, G_new> + 1e-10) per param group,
    accumulated in Python floats."""

    def __init__(self, optimizer, meta_gamma, meta_update, batches_per_epoch):
        self.optimizer, self.meta_gamma = optimizer, meta_gamma
        self.meta_update = int(meta_update * batches_per_epoch)
        self.cnt = 0
        self.cache = {}

    def step(self):
        self.optimizer.step()
        if self.cnt == self.meta_update:
            self.cnt = 0
            self.update()
        self.cnt += 1

    @torch.no_grad()
    def update(self):
        for group in self.optimizer.param_groups:
            dlr, dlr2 = 0.0, 0.0
            for p in group["params"]:
                if p not in self.cache:
                    self.cache[p] = [p.clone(), torch.zeros_like(p)]
                cached_p, u_old = self.cache[p]
                u_new = (cached_p - p) / group["lr"]
                self.cache[p] = [p.clone(), u_new.clone()]
                dlr += (u_old * u_new).sum().item()
                dlr2 += (u_old * u_old).sum().item()
            group["lr"] *= 1 + self.meta_gamma * dlr / (dlr2 - dlr + 1e-10)


@pytest.mark.parametrize("name", ["tlr", "tlr-pl"])
def test_ntlr_compat_matches_the_public_code(name):
    p, n, gamma = 0.3, 10, 0.25  # K = int(0.3 * 10) = 3
    ours, ref = make_model(torch.float32), make_model(torch.float32)
    opt = metaopt.make_optimizer(name, ours.parameters(), lr=0.05, window=p, steps_per_epoch=n, ntlr_compat=True,
                                 meta_gamma=gamma)
    groups = [{"params": [q]} for q in ref.parameters()] if name == "tlr-pl" else ref.parameters()
    ref_opt = NTLRReference(torch.optim.SGD(groups, lr=0.05, momentum=0.8, weight_decay=5e-4, foreach=False),
                            gamma, p, n)
    lrs = []
    for step, (x, y) in enumerate(batches(torch.float32, 20), start=1):
        for model, o in ((ours, opt), (ref, ref_opt)):
            (o.optimizer if o is ref_opt else o).zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
        for q, r in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(q, r), step
        ref_lrs = [g["lr"] for g in ref_opt.optimizer.param_groups]
        our_lrs = [opt.state[q]["lr"] for q in ours.parameters()] if name == "tlr-pl" else [opt.param_groups[0]["lr"]]
        assert our_lrs == ref_lrs, step
        lrs.append(our_lrs[0])
    # Boundaries after steps 4, 7, 10, ...; the cache is set at the first, so the first real change is at the third.
    assert lrs[:9] == [0.05] * 9 and lrs[9] != 0.05


def test_ntlr_factor_examples_and_zero_window():
    assert ntlr_factor(2.0, 1.0, 0.2) == close(0.6, rel=1e-9)  # G_prev = (1, 0), G = (2, 0); eq. 9 gives 1.25
    assert 1 + newton_ratio(2.0, 4.0, 0.25) == 1.25
    assert ntlr_factor(1.0, 1.0, 0.2) == close(2e9, rel=1e-9)  # G = (1, 2): unbounded
    # K = int(0.05 * 10) = 0: a single (no-op) update at the first step, never another.
    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr", model.parameters(), lr=0.05, window=0.05, steps_per_epoch=10,
                                 ntlr_compat=True)
    assert run(model, opt, batches(F64, 8)) == [0.05] * 8
    assert opt.param_groups[0]["boundaries"] == 1


def test_ntlr_compat_negative_lr_is_kept_and_counted():
    """G_prev = (1,) then G = (1.1,) gives 1 + 0.2 * 1.1 / (1 - 1.1) = -1.2: the code does not clip."""
    rule = TLRRule(lr=0.1, window=1, momentum=0.0, weight_decay=0.0, ntlr_compat=True, meta_gamma=0.2)
    params = {"w": torch.zeros(1, dtype=F64)}
    state = rule.init(params)._replace(window_pos=1, boundaries=2, prev_direction={"w": torch.ones(1, dtype=F64)})
    _, state = rule.step(params, {"w": torch.full((1,), 1.1, dtype=F64)}, state)
    assert state.lr == close(-0.12, rel=1e-8) and state.negative_lr_steps == 1


# -- resume, non-finite, errors, schedulers ----------------------------------------------------------------------------


RESUME = [("tlr", dict()), ("tlr", dict(window=3)), ("tlr-pl", dict()), ("tlr-pl", dict(window=3)),
          ("tlr", dict(window=0.3, steps_per_epoch=10, ntlr_compat=True)), ("tlr", dict(eta=0.05)),
          ("tlr", dict(momentum=0.9, weight_decay=1e-3)), ("tlr-naive", dict(eta=0.05))]


@pytest.mark.parametrize("name,kw", RESUME)
def test_state_dict_resume_is_bit_exact(name, kw):
    """5 steps, save, a fresh optimizer loads, 5 more == 10 straight (with K = 3 the save is mid-window)."""
    data = batches(torch.float32, 10)
    runner = run_closure if name == "tlr-naive" else run
    straight = make_model(torch.float32)
    opt = metaopt.make_optimizer(name, straight.parameters(), lr=0.05, **kw)
    runner(straight, opt, data)

    resumed = make_model(torch.float32)
    opt1 = metaopt.make_optimizer(name, resumed.parameters(), lr=0.05, **kw)
    runner(resumed, opt1, data[:5])
    saved = copy.deepcopy(opt1.state_dict())
    if kw.get("window") == 3:
        assert saved["param_groups"][0]["window_pos"] == 2
    opt2 = metaopt.make_optimizer(name, resumed.parameters(), lr=0.05, **kw)
    opt2.load_state_dict(saved)
    runner(resumed, opt2, data[5:])
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    if name == "tlr-pl":
        assert [opt2.state[p]["lr"] for p in resumed.parameters()] == \
            [opt.state[p]["lr"] for p in straight.parameters()]


@pytest.mark.parametrize("name,kw", [("tlr", dict()), ("tlr", dict(window=3)), ("tlr-pl", dict(window=2))])
def test_nonfinite_gradient_is_skipped_and_counted(name, kw):
    model = make_model(F64)
    opt = metaopt.make_optimizer(name, model.parameters(), **kw)
    run(model, opt, batches(F64, 2))
    state_before, after = assert_nonfinite_step_is_skipped(model, opt)
    assert {k: v for k, v in after["param_groups"][0].items() if k != "nonfinite_skipped"} == \
        {k: v for k, v in state_before["param_groups"][0].items() if k != "nonfinite_skipped"}


@pytest.mark.parametrize("bad", ["first", "lookahead"])
def test_naive_nonfinite_gradient_is_skipped(bad):
    x = torch.tensor([1.0], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("tlr-naive", [x], lr=0.1, eta=0.01)
    calls = []

    def closure():
        calls.append(1)
        scale = float("nan") if (bad == "first") == (len(calls) == 1) else 1.0
        return (scale * x**2).sum()

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert float(x.detach()) == 1.0 and opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[0]["nonfinite_skipped"] == 1
    assert len(calls) == (1 if bad == "first" else 2)
    with pytest.raises(FloatingPointError, match="non-finite"):
        calls.clear()
        metaopt.make_optimizer("tlr-naive", [x], nonfinite="raise").step(closure)
    assert float(x.detach()) == 1.0


def test_nonfinite_learning_rate_is_skipped_or_raises():
    """A fixed-eta update that overflows (eta = 1e300, a = 1e20) never reaches the parameters."""
    x = torch.tensor([1e10], dtype=F64, requires_grad=True)
    opt = metaopt.make_optimizer("tlr", [x], lr=0.0, eta=1e300)
    x.grad = x.detach().clone()
    opt.step()  # a = <g_1, 0> = 0: alpha stays 0
    with pytest.warns(RuntimeWarning, match="non-finite learning-rate update"):
        opt.step()
    assert float(x.detach()) == 1e10 and opt.param_groups[0]["lr"] == 0.0
    assert opt.param_groups[0]["nonfinite_skipped"] == 1 and opt.param_groups[0]["step"] == 1
    strict = metaopt.make_optimizer("tlr", [x], lr=0.0, eta=1e300, nonfinite="raise")
    strict.step()
    with pytest.raises(FloatingPointError, match="non-finite learning rate"):
        strict.step()


@pytest.mark.parametrize("name,kw,match", [
    ("tlr", dict(bound=0.0), "bound"),
    ("tlr-pl", dict(bound=-0.25), "bound"),
    ("tlr", dict(window=0), "window"),
    ("tlr", dict(window=-3), "window"),
    ("tlr-pl", dict(window=0.0, steps_per_epoch=10), "window"),
    ("tlr", dict(window=1.5, steps_per_epoch=10), "window"),
    ("tlr", dict(window=True), "window"),
    ("tlr", dict(window=0.33), "steps_per_epoch"),
    ("tlr", dict(window=0.33, steps_per_epoch=0), "steps_per_epoch"),
    ("tlr", dict(window=3, steps_per_epoch=10), "steps_per_epoch"),
    ("tlr", dict(lr=-0.1), "learning rate"),
    ("tlr-pl", dict(lr=-0.1), "learning rate"),
    ("tlr-naive", dict(lr=-0.1), "learning rate"),
    ("tlr-naive", dict(eta=-1.0), "eta"),
    ("tlr", dict(eta=-1.0), "eta"),
    ("tlr", dict(momentum=-0.5), "momentum"),
    ("tlr", dict(weight_decay=-1.0), "weight_decay"),
    ("tlr", dict(ntlr_compat=True), "window"),
    ("tlr", dict(meta_gamma=0.25), "meta_gamma"),
    ("tlr", dict(window=3, ntlr_compat=True, eta=0.1), "eta"),
    ("tlr", dict(nonfinite="ignore"), "nonfinite"),
])
def test_invalid_hyperparameters_name_the_argument(name, kw, match):
    with pytest.raises(ValueError, match=match):
        metaopt.make_optimizer(name, [torch.zeros(1, requires_grad=True)], **kw)


def test_scheduler_inside_a_window_raises_between_windows_works():
    data = batches(F64, 9)
    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr", model.parameters(), lr=0.05, window=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # changes at the boundaries only
    lrs = run(model, opt, data, after_step=lambda i: sched.step())
    # lrs[i] is read before the scheduler's step: the second window runs at the scheduled 0.025, and its boundary
    # updates that value by eq. 9.
    assert lrs[:3] == [0.05] * 3 and lrs[3:5] == [0.025] * 2 and lrs[5] != 0.025

    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr", model.parameters(), lr=0.05, window=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.raises(RuntimeError, match="inside a TLR window"):
        run(model, opt, data, after_step=lambda i: sched.step())
    assert opt.param_groups[0]["step"] == 1


def test_every_step_mode_takes_a_changed_lr_as_its_base():
    """With window=None a scheduler (or the user) may set alpha between steps: the next update starts from it."""
    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr", model.parameters(), lr=0.05)
    grads = []
    for i, (x, y) in enumerate(batches(F64, 3)):
        if i == 2:
            opt.param_groups[0]["lr"] = 0.02
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    a = sum(float((g * h).sum()) for g, h in zip(grads[2], grads[1]))
    sq = sum(float((g * g).sum()) for g in grads[2])
    lr = opt.param_groups[0]["lr"]
    assert lr == close(0.02 * (1 + a / max(4 * (sq - a), a / 0.25)), rel=1e-12) and lr != 0.02
    for p, w, g in zip(model.parameters(), before, grads[2]):
        assert torch.equal(p, torch.add(w, g, alpha=-lr))


def test_per_tensor_lr_is_locked_after_the_first_step():
    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr-pl", model.parameters(), lr=0.05)
    opt.param_groups[0]["lr"] = 0.03  # before the first step: the tensors' initial alpha
    run(model, opt, batches(F64, 1))
    assert all(opt.state[p]["lr"] == 0.03 for p in model.parameters())
    opt.param_groups[0]["lr"] = 0.01
    with pytest.raises(RuntimeError, match="per tensor"):
        run(model, opt, batches(F64, 1))


def test_ntlr_compat_lr_may_change_right_after_a_boundary_only():
    model = make_model(F64)
    opt = metaopt.make_optimizer("tlr", model.parameters(), lr=0.05, window=2, ntlr_compat=True)
    data = batches(F64, 8)
    run(model, opt, data[:3])  # boundaries after steps 3, 5, 7 (K + 1, then every K)
    opt.param_groups[0]["lr"] = 0.04
    run(model, opt, data[3:4])
    opt.param_groups[0]["lr"] = 0.03
    with pytest.raises(RuntimeError, match="inside a TLR window"):
        run(model, opt, data[4:5])


# -- the functional cores are differentiable -------------------------------------------------------------------------


def _p1_unroll(rule, lr, bound, steps, x0=1.0, a=2.0):
    params = {"x": torch.tensor([x0], dtype=F64)}
    state = rule.init(params)
    for _ in range(steps):
        params, state = rule.step(params, {"x": a * params["x"]}, state)
    return 0.5 * a * (params["x"] ** 2).sum()


@pytest.mark.parametrize("kw", [dict(), dict(window=2), dict(window=2, momentum=0.5, weight_decay=0.01),
                                dict(per_tensor=True)])
def test_efficient_core_is_differentiable_in_lr_and_bound(kw):
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    bound = torch.tensor(0.25, dtype=F64, requires_grad=True)
    steps = 6
    loss = _p1_unroll(TLRRule(lr, bound, **kw), lr, bound, steps)
    d_lr, d_bound = torch.autograd.grad(loss, (lr, bound))

    def f(lr_value, bound_value):
        return float(_p1_unroll(TLRRule(lr_value, bound_value, **kw), None, None, steps))

    eps = 1e-6
    fd_lr = (f(0.1 + eps, 0.25) - f(0.1 - eps, 0.25)) / (2 * eps)
    fd_bound = (f(0.1, 0.25 + eps) - f(0.1, 0.25 - eps)) / (2 * eps)
    assert float(d_lr) == pytest.approx(fd_lr, rel=1e-6)
    assert float(d_bound) == pytest.approx(fd_bound, rel=1e-6) and float(d_bound) != 0.0
    # Tensor and float hyper-parameters give the same trajectory.
    assert float(loss.detach()) == pytest.approx(f(0.1, 0.25), rel=1e-14)


def test_naive_core_is_differentiable_and_pure():
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    eta = torch.tensor(0.01, dtype=F64, requires_grad=True)

    def unroll(lr_value, eta_value):
        rule = NaiveTLRRule(lr_value, eta_value, grad_fn=lambda p: {"x": 2.0 * p["x"]})
        params = {"x": torch.tensor([1.0], dtype=F64)}
        state = rule.init(params)
        for _ in range(4):
            params, state = rule.step(params, {"x": 2.0 * params["x"]}, state)
        return (params["x"] ** 2).sum(), state

    loss, state = unroll(lr, eta)
    d_lr, d_eta = torch.autograd.grad(loss, (lr, eta))
    eps = 1e-6
    fd_lr = (float(unroll(0.1 + eps, 0.01)[0]) - float(unroll(0.1 - eps, 0.01)[0])) / (2 * eps)
    fd_eta = (float(unroll(0.1, 0.01 + eps)[0]) - float(unroll(0.1, 0.01 - eps)[0])) / (2 * eps)
    assert float(d_lr) == pytest.approx(fd_lr, rel=1e-6)
    assert float(d_eta) == pytest.approx(fd_eta, rel=1e-6)
    # T-3 through the core: alpha_2 = 0.14794753024 after two steps.
    rule = NaiveTLRRule(0.1, 0.01, grad_fn=lambda p: {"x": 2.0 * p["x"]})
    params = {"x": torch.tensor([1.0], dtype=F64)}
    state = rule.init(params)
    for _ in range(2):
        new, state = rule.step(params, {"x": 2.0 * params["x"]}, state)
        assert params["x"] is not new["x"]
        params = new
    assert state.lr == close(0.14794753024, rel=1e-15)


def test_efficient_core_is_pure_and_ratio_has_finite_gradient_at_zero():
    rule = TLRRule(0.1, window=2, momentum=0.8, weight_decay=1e-3)
    params = {"w": torch.tensor([1.0, -2.0], dtype=F64)}
    grads = {"w": torch.tensor([0.5, 0.25], dtype=F64)}
    state = rule.init(params)
    snapshot = ({k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in grads.items()})
    for _ in range(3):
        new, state = rule.step(params, grads, state)
    assert torch.equal(params["w"], snapshot[0]["w"]) and torch.equal(grads["w"], snapshot[1]["w"])
    assert all(v is not grads["w"] for v in state.prev_direction.values())
    a = torch.tensor(0.0, dtype=F64, requires_grad=True)
    sq = torch.tensor(0.0, dtype=F64, requires_grad=True)
    r = newton_ratio(a, sq, 0.25)
    assert float(r.detach()) == 0.0
    assert all(torch.isfinite(g) for g in torch.autograd.grad(r, (a, sq)))


IN_PLACE = [("tlr", dict(lr=0.05)), ("tlr", dict(lr=0.05, momentum=0.8, weight_decay=1e-3)),
            ("tlr-pl", dict(lr=0.05, weight_decay=1e-3)), ("tlr", dict(lr=0.05, eta=0.01))]


@pytest.mark.parametrize("name,kw", IN_PLACE, ids=["tlr", "tlr-momentum-decay", "tlr-pl-decay", "tlr-eta"])
def test_in_place_every_step_face_equals_the_rule_and_resumes_its_state(name, kw):
    """Every-step TLR steps in place with torch._foreach_* ops by default; fast=False steps through TLRRule. Same bits,
    same state (per-tensor alphas included), each resuming the other's state_dict; non-finite gradients are screened
    through the inner products and skipped with nothing written."""
    fast, slow = make_model(torch.float32), make_model(torch.float32)
    fast_opt = metaopt.make_optimizer(name, fast.parameters(), **kw)
    slow_opt = metaopt.make_optimizer(name, slow.parameters(), fast=False, **kw)
    assert run(fast, fast_opt, batches(torch.float32, 5)) == run(slow, slow_opt, batches(torch.float32, 5))
    a, b = assert_same_parameters_and_state(fast, fast_opt, slow, slow_opt)
    fast_opt.load_state_dict(b)
    slow_opt.load_state_dict(a)
    more = batches(torch.float32, 4, seed=2)
    assert run(fast, fast_opt, more) == run(slow, slow_opt, more)
    assert_same_parameters_and_state(fast, fast_opt, slow, slow_opt)
    assert_nonfinite_step_is_skipped(fast, fast_opt)
    assert fast_opt.param_groups[0]["lr"] == slow_opt.param_groups[0]["lr"]
