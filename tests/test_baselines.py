"""The classic optimizers equal torch.optim bit for bit, and the shared face behaves (errors, non-finite, resume)."""

import copy

import pytest
import torch
from helpers import assert_nonfinite_step_is_skipped, assert_same_parameters_and_state

import metaopt
from metaopt.baselines import AdamRule, SGDRule

# (metaopt name, metaopt kwargs, torch class, torch kwargs)
CLASSICS = [
    ("sgd", dict(lr=0.1), torch.optim.SGD, dict(lr=0.1)),
    ("sgd", dict(lr=0.05, weight_decay=0.01), torch.optim.SGD, dict(lr=0.05, weight_decay=0.01)),
    ("momentum", dict(lr=0.05, momentum=0.9), torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("momentum", dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3), torch.optim.SGD,
     dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3)),
    ("nesterov", dict(lr=0.05, momentum=0.9), torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("adam", dict(lr=1e-2), torch.optim.Adam, dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01), torch.optim.Adam,
     dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    ("rmsprop", dict(lr=1e-2), torch.optim.RMSprop, dict(lr=1e-2)),
    ("rmsprop", dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3), torch.optim.RMSprop,
     dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3)),
    ("adagrad", dict(lr=0.1), torch.optim.Adagrad, dict(lr=0.1)),
    ("adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-3), torch.optim.Adagrad,
     dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-3)),
    ("adadelta", dict(lr=1.0), torch.optim.Adadelta, dict(lr=1.0)),
    ("adadelta", dict(lr=0.5, rho=0.8, weight_decay=1e-3), torch.optim.Adadelta,
     dict(lr=0.5, rho=0.8, weight_decay=1e-3)),
]


def make_model(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def run(model, opt, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen).to(dtype)
        y = torch.randn(16, 3, generator=gen).to(dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,kw,torch_cls,torch_kw", CLASSICS)
def test_classic_equals_torch_bit_for_bit(name, kw, torch_cls, torch_kw, dtype):
    ours, ref = make_model(dtype), make_model(dtype)
    run(ours, metaopt.make_optimizer(name, ours.parameters(), **kw), 12)
    run(ref, torch_cls(ref.parameters(), foreach=False, **torch_kw), 12)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q), f"{name} {kw} differs from torch by {(p - q).abs().max().item()}"


@pytest.mark.parametrize("name,kw", [(c[0], c[1]) for c in CLASSICS])
def test_in_place_face_equals_the_rule_and_resumes_its_state(name, kw):
    """The default face steps in place with torch._foreach_* ops; fast=False steps through the functional rule. Both
    give the same bits, keep the same state, and each resumes the other's state_dict."""
    fast, slow = make_model(torch.float32), make_model(torch.float32)
    fast_opt = metaopt.make_optimizer(name, fast.parameters(), **kw)
    slow_opt = metaopt.make_optimizer(name, slow.parameters(), fast=False, **kw)
    run(fast, fast_opt, 5)
    run(slow, slow_opt, 5)
    a, b = assert_same_parameters_and_state(fast, fast_opt, slow, slow_opt)
    # crossed: the reference path continues from the fast path's state, and the other way round
    fast_opt.load_state_dict(b)
    slow_opt.load_state_dict(a)
    run(fast, fast_opt, 4, seed=2)
    run(slow, slow_opt, 4, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(fast.parameters(), slow.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_the_finiteness_check_is_exact(dtype):
    from metaopt.core import all_finite

    big = torch.finfo(dtype).max / 4
    tensors = [torch.randn(5, 3).to(dtype), torch.full((7,), big, dtype=dtype)]  # finite, but their sum overflows
    assert all_finite(tensors)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [t.clone() for t in tensors]
        broken[0][2, 1] = bad
        assert not all_finite(broken)
    mixed = [torch.full((3,), float("inf")), torch.full((3,), -float("inf"))]  # inf - inf: a NaN sum, still caught
    assert not all_finite(mixed)


def test_a_tensor_learning_rate_takes_the_rule_path():
    ours, ref = make_model(torch.float64), make_model(torch.float64)
    opt = metaopt.make_optimizer("adam", ours.parameters(), lr=0.01)
    opt.param_groups[0]["lr"] = torch.tensor(0.01, dtype=torch.float64)
    run(ours, opt, 3)
    run(ref, metaopt.make_optimizer("adam", ref.parameters(), lr=0.01, fast=False), 3)
    assert all(torch.allclose(p, q, rtol=0, atol=1e-12) for p, q in zip(ours.parameters(), ref.parameters()))
    assert opt.param_groups[0]["step"] == 3


def test_functional_rule_is_pure_and_differentiable():
    """The rule never mutates its inputs, and a tensor learning rate carries gradients (meta-training)."""
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    grads = {"w": torch.tensor([0.5, 0.25], dtype=torch.float64)}
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    for rule in (SGDRule(lr, momentum=0.9), AdamRule(lr)):
        state = rule.init(params)
        before = {k: v.clone() for k, v in params.items()}
        new, _ = rule.step(params, grads, state)
        assert torch.equal(params["w"], before["w"])
        (dlr,) = torch.autograd.grad(new["w"].sum(), lr)
        assert torch.isfinite(dlr) and dlr != 0


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="Valid names: .*adam"):
        metaopt.make_optimizer("adamm", [torch.zeros(1, requires_grad=True)])


@pytest.mark.parametrize("name,kw,match", [
    ("sgd", dict(lr=-1.0), "learning rate"),
    ("adam", dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    ("adam", dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    ("adam", dict(eps=-1e-8), "epsilon"),
    ("momentum", dict(momentum=-0.5), "momentum"),
    ("adadelta", dict(rho=1.5), "rho"),
    ("sgd", dict(nonfinite="ignore"), "nonfinite"),
])
def test_invalid_hyperparameters_name_the_argument(name, kw, match):
    with pytest.raises(ValueError, match=match):
        metaopt.make_optimizer(name, [torch.zeros(1, requires_grad=True)], **kw)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "rmsprop", "adagrad", "adadelta"])
def test_nonfinite_gradient_is_skipped_and_counted(name):
    model = make_model(torch.float64)
    opt = metaopt.make_optimizer(name, model.parameters())
    run(model, opt, 2)
    assert_nonfinite_step_is_skipped(model, opt)


def test_nonfinite_raise_mode():
    model = make_model(torch.float64)
    opt = metaopt.make_optimizer("adam", model.parameters(), nonfinite="raise")
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "rmsprop", "adagrad", "adadelta"])
def test_state_dict_resume_is_bit_exact(name):
    straight = make_model(torch.float32)
    opt = metaopt.make_optimizer(name, straight.parameters())
    run(straight, opt, 5, seed=1)
    run(straight, opt, 5, seed=2)

    resumed = make_model(torch.float32)
    opt1 = metaopt.make_optimizer(name, resumed.parameters())
    run(resumed, opt1, 5, seed=1)
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = metaopt.make_optimizer(name, resumed.parameters())
    opt2.load_state_dict(saved)
    run(resumed, opt2, 5, seed=2)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_drives_the_rule():
    ours, ref = make_model(torch.float64), make_model(torch.float64)
    opt = metaopt.make_optimizer("momentum", ours.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False)
    for o, m in ((opt, ours), (ref_opt, ref)):
        sched = torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        for i in range(6):
            run(m, o, 1, seed=i)
            sched.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_param_groups_and_named_parameters():
    model = make_model(torch.float64)
    named = metaopt.make_optimizer("adam", model.named_parameters(), lr=1e-2)
    assert named.param_groups[0]["param_names"][0] == "0.weight"
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}]
    opt = metaopt.make_optimizer("sgd", groups, lr=0.01)
    ref = make_model(torch.float64)
    ref_opt = torch.optim.SGD([{"params": ref[0].parameters(), "lr": 0.1}, {"params": ref[2].parameters()}],
                              lr=0.01, foreach=False)
    run(model, opt, 3)
    run(ref, ref_opt, 3)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
