"""LRS-OPT: the schedule hypergradient through the unrolled metaopt rules equals central finite differences, an
independent ``torch.func`` unroll and MARTHE's tangents (RTHO / HD); projected gradient descent on the schedule."""

import copy

import pytest
import torch
from torch.func import functional_call

import metaopt
import metaopt.hypergrad.marthe  # noqa: F401  (registers rtho, hd-val)
from metaopt.hypergrad.lrs_opt import optimize_schedule, schedule_hypergradient

F64 = torch.float64
T = 6


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(F64)


def make_data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    train = [(torch.randn(5, 3, generator=gen, dtype=F64), torch.randn(5, 1, generator=gen, dtype=F64))
             for _ in range(T)]
    val = (torch.randn(7, 3, generator=gen, dtype=F64), torch.randn(7, 1, generator=gen, dtype=F64))
    return train, val


def mse(out, y):
    return torch.nn.functional.mse_loss(out, y)


def loss_fns(train, val):
    return (lambda fmodel, t: mse(fmodel(train[t][0]), train[t][1])), (lambda fmodel: mse(fmodel(val[0]), val[1]))


SCHEDULE = torch.tensor([0.3, 0.25, 0.4, 0.2, 0.35, 0.15], dtype=F64)
BASES = {"sgd": dict(), "sgdm": dict(momentum=0.9, weight_decay=1e-3)}


def torch_func_hypergrad(model, schedule, train, val, momentum=0.0, weight_decay=0.0, group_of=None):
    """Independent reference: functional_call + a hand-written unrolled SGD / heavy-ball loop (torch's buffer
    convention v_1 = g_0), differentiated with respect to the schedule."""
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    eta = schedule.detach().clone().requires_grad_()
    bufs = {}
    for t, (x, y) in enumerate(train):
        loss = mse(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        new = {}
        for (k, p), g in zip(params.items(), grads):
            g = g + weight_decay * p
            if momentum:
                bufs[k] = g if t == 0 else momentum * bufs[k] + g
                g = bufs[k]
            rate = eta[t] if eta.dim() == 1 else eta[t, group_of[k]]
            new[k] = p - rate * g
        params = new
    objective = mse(functional_call(model, params, (val[0],)), val[1])
    (grad,) = torch.autograd.grad(objective, eta)
    return objective.detach(), grad


def plain_final_loss(model, schedule, train, val, **kw):
    """f_T(η) by ordinary torch.optim.SGD steps with the learning rate set before each step."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, foreach=False, **kw)
    for (x, y), eta in zip(train, schedule.tolist()):
        opt.param_groups[0]["lr"] = eta
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return mse(model(val[0]), val[1]).item()


@pytest.mark.parametrize("base", list(BASES))
def test_hypergradient_equals_central_finite_differences(base):
    model, (train, val) = tiny_model(), make_data()
    kw = BASES[base]
    result = schedule_hypergradient(model, torch.optim.SGD(model.parameters(), lr=0.0, **kw), SCHEDULE,
                                    *loss_fns(train, val))
    assert result.val_loss.item() == pytest.approx(plain_final_loss(model, SCHEDULE, train, val, **kw), rel=1e-13)
    eps = 1e-6
    fd = torch.tensor([(plain_final_loss(model, SCHEDULE + eps * e, train, val, **kw)
                        - plain_final_loss(model, SCHEDULE - eps * e, train, val, **kw)) / (2 * eps)
                       for e in torch.eye(T, dtype=F64)], dtype=F64)
    torch.testing.assert_close(result.hypergrad, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("base", list(BASES))
def test_hypergradient_equals_torch_func_unroll(base):
    model, (train, val) = tiny_model(2), make_data(3)
    kw = BASES[base]
    before = [p.detach().clone() for p in model.parameters()]
    result = schedule_hypergradient(model, torch.optim.SGD(model.parameters(), lr=0.0, **kw), SCHEDULE,
                                    *loss_fns(train, val))
    ref_loss, ref_grad = torch_func_hypergrad(model, SCHEDULE, train, val, **kw)
    assert result.val_loss.item() == pytest.approx(ref_loss.item(), rel=1e-13)
    torch.testing.assert_close(result.hypergrad, ref_grad, rtol=1e-11, atol=1e-14)
    assert result.hypergrad.shape == SCHEDULE.shape and result.hypergrad.dtype == F64
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # w̄ untouched


def test_per_group_schedule_and_shared_schedule():
    """A (T, G) schedule gives one rate per step and group (higher's override, one entry per group); a shared (T,)
    schedule's hypergradient is the sum over the groups' columns (chain rule)."""
    model, (train, val) = tiny_model(4), make_data(5)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    opt = torch.optim.SGD(groups, lr=0.0, momentum=0.5)
    per_group = torch.stack([SCHEDULE, SCHEDULE.flip(0)], dim=1)
    result = schedule_hypergradient(model, opt, per_group, *loss_fns(train, val))
    group_of = {"0.weight": 0, "0.bias": 0, "2.weight": 1, "2.bias": 1}
    _, ref = torch_func_hypergrad(model, per_group, train, val, momentum=0.5, group_of=group_of)
    torch.testing.assert_close(result.hypergrad, ref, rtol=1e-11, atol=1e-14)

    shared_schedule = torch.stack([SCHEDULE, SCHEDULE], dim=1)
    shared = schedule_hypergradient(model, opt, SCHEDULE, *loss_fns(train, val))
    both = schedule_hypergradient(model, opt, shared_schedule, *loss_fns(train, val))
    torch.testing.assert_close(shared.hypergrad, both.hypergrad.sum(dim=1), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name,reduce", [("rtho", lambda g: g.sum()), ("hd-val", lambda g: g[-1])])
def test_marthe_tangent_gives_the_schedule_hypergradient(name, reduce):
    """With a fixed constant schedule (β = 0), RTHO's Δη_T = ⟨∇E(w_T), Σ_i dw_T/dη_i⟩ = Σ_i ∂f_T/∂η_i and HD's
    Δη_T = ∂f_T/∂η_{T−1}: the online tangents against the offline exact hypergradient (M-2, M-3)."""
    model, (train, val) = tiny_model(6), make_data(7)
    kw = BASES["sgdm"]
    eta = 0.2
    exact = schedule_hypergradient(model, torch.optim.SGD(model.parameters(), lr=0.0, **kw),
                                   torch.full((T,), eta, dtype=F64), *loss_fns(train, val))
    online = copy.deepcopy(model)
    opt = metaopt.make_optimizer(name, online.parameters(), lr=eta, hypergrad_lr=0.0, base="momentum", **kw)
    for x, y in train:
        opt.step(lambda: mse(online(x), y), lambda: mse(online(val[0]), val[1]))
    assert opt.param_groups[0]["delta_lr"] == pytest.approx(reduce(exact.hypergrad).item(), rel=1e-10)


def test_optimize_schedule_is_projected_gradient_descent():
    model, (train, val) = tiny_model(8), make_data(9)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    init = torch.full((T,), 0.05, dtype=F64)
    seen = []
    history = optimize_schedule(model, opt, init, *loss_fns(train, val), outer_steps=4, outer_lr=0.01,
                                callback=lambda k, result, eta: seen.append(k))
    assert history.schedules.shape == (5, T) and history.val_losses.shape == (4,)
    assert history.hypergrads.shape == (4, T) and seen == [0, 1, 2, 3]
    assert torch.equal(history.schedules[0], init)
    for k in range(4):
        _, ref = torch_func_hypergrad(model, history.schedules[k], train, val, momentum=0.9)
        torch.testing.assert_close(history.hypergrads[k], ref, rtol=1e-11, atol=1e-14)
        assert torch.equal(history.schedules[k + 1],
                           (history.schedules[k] - 0.01 * history.hypergrads[k]).clamp(min=0.0))
    assert (history.val_losses[1:] < history.val_losses[:-1]).all()  # descent on f_T
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_optimize_schedule_projects_onto_nonnegative_rates():
    model, (train, val) = tiny_model(10), make_data(11)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    init = torch.full((T,), 0.01, dtype=F64)
    grad = schedule_hypergradient(model, opt, init, *loss_fns(train, val)).hypergrad
    assert (grad > 0).any()  # some rates want to go below zero with a large step
    history = optimize_schedule(model, opt, init, *loss_fns(train, val), outer_steps=1, outer_lr=1e3)
    unprojected = init - 1e3 * grad
    assert (unprojected < 0).any()
    assert torch.equal(history.schedules[1], unprojected.clamp(min=0.0))
    assert optimize_schedule(model, opt, init, *loss_fns(train, val), outer_steps=0,
                             outer_lr=0.1).schedules.shape == (1, T)


def test_optimize_schedule_with_adam_steps_is_projected_adam():
    """outer="adam": each iteration is torch.optim.Adam's step on the schedule with the hypergradient as its
    gradient, then the projection onto η ≥ 0; it lowers f_T on the tiny problem too."""
    model, (train, val) = tiny_model(12), make_data(13)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.5)
    init = torch.full((T,), 0.05, dtype=F64)
    history = optimize_schedule(model, opt, init, *loss_fns(train, val), outer_steps=5, outer_lr=0.01, outer="adam")
    eta = init.clone()
    adam = torch.optim.Adam([eta], lr=0.01)
    for k in range(5):
        _, ref = torch_func_hypergrad(model, history.schedules[k], train, val, momentum=0.5)
        torch.testing.assert_close(history.hypergrads[k], ref, rtol=1e-11, atol=1e-14)
        eta.grad = history.hypergrads[k].clone()
        adam.step()
        with torch.no_grad():
            eta.clamp_(min=0.0)
        assert torch.equal(history.schedules[k + 1], eta)
    assert history.val_losses[-1] < history.val_losses[0]
    with pytest.raises(ValueError, match="outer"):
        optimize_schedule(model, opt, init, *loss_fns(train, val), outer_steps=1, outer_lr=0.01, outer="sgd")


@pytest.mark.parametrize("schedule,kw,match", [
    (torch.tensor([0.1, -0.1], dtype=F64), {}, "non-negative"),
    (torch.zeros(2, 3, dtype=F64), {}, "shape"),
    (torch.zeros(0, dtype=F64), {}, "shape"),
    (torch.tensor([1, 2]), {}, "floating-point"),
    (torch.ones(2, dtype=F64), dict(outer_steps=-1), "outer_steps"),
    (torch.ones(2, dtype=F64), dict(outer_lr=-1.0), "outer_lr"),
])
def test_invalid_arguments(schedule, kw, match):
    model = tiny_model()
    args = dict(outer_steps=1, outer_lr=0.1) | kw
    with pytest.raises(ValueError, match=match):
        optimize_schedule(model, torch.optim.SGD(model.parameters(), lr=0.0), schedule, lambda m, t: m(
            torch.ones(1, 3, dtype=F64)).sum(), lambda m: m(torch.ones(1, 3, dtype=F64)).sum(), **args)


def test_every_base_unrolls_its_own_rule_from_its_current_state():
    """torch.optim.SGD and its metaopt face give the same hypergradient; so do torch.optim.Adam and metaopt's adam,
    also after a step was taken (the unroll starts from the optimizer's current state, as torch would go on)."""
    model, (train, val) = tiny_model(12), make_data(13)
    fns = loss_fns(train, val)
    torch_sgd = schedule_hypergradient(model, torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9), SCHEDULE,
                                       *fns)
    face = schedule_hypergradient(model, metaopt.make_optimizer("momentum", model.parameters(), momentum=0.9),
                                  SCHEDULE, *fns)
    torch.testing.assert_close(face.hypergrad, torch_sgd.hypergrad, rtol=1e-13, atol=1e-16)
    for warm in (False, True):
        adams = [copy.deepcopy(model), copy.deepcopy(model)]
        opts = [torch.optim.Adam(adams[0].parameters(), lr=0.01),
                metaopt.make_optimizer("adam", adams[1].parameters(), lr=0.01)]
        if warm:  # one real step first: the unroll continues from the moments and the step count
            for m, opt in zip(adams, opts):
                mse(m(train[0][0]), train[0][1]).backward()
                opt.step()
        results = [schedule_hypergradient(m, opt, SCHEDULE, *loss_fns(train, val)) for m, opt in zip(adams, opts)]
        torch.testing.assert_close(results[0].hypergrad, results[1].hypergrad, rtol=1e-12, atol=1e-15)
        assert results[0].val_loss.item() == pytest.approx(results[1].val_loss.item(), rel=1e-13)
    assert not torch.equal(results[0].hypergrad, schedule_hypergradient(
        model, torch.optim.Adam(model.parameters(), lr=0.01), SCHEDULE, *fns).hypergrad)  # the state mattered


def test_unsupported_optimizers_and_foreign_parameters_are_refused():
    model = tiny_model()
    fns = (lambda m, t: m(torch.ones(1, 3, dtype=F64)).sum(), lambda m: m(torch.ones(1, 3, dtype=F64)).sum())
    with pytest.raises(ValueError, match="RMSprop"):
        schedule_hypergradient(model, torch.optim.RMSprop(model.parameters()), SCHEDULE, *fns)
    with pytest.raises(ValueError, match="amsgrad"):
        schedule_hypergradient(model, torch.optim.Adam(model.parameters(), amsgrad=True), SCHEDULE, *fns)
    other = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="not the model's"):
        schedule_hypergradient(model, torch.optim.SGD([other], lr=0.1), SCHEDULE, *fns)
