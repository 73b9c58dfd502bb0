"""The contract every registered hand-designed optimizer keeps (registry-driven: a new optimizer is one table row).

On a least-squares problem: the loss falls, every update is finite, the state's shapes are stable across steps, and
``state_dict()`` / ``load_state_dict()`` resume exactly. Learned names (which load pretrained checkpoints) are covered
by tests/test_learned.py with fresh instances.
"""

import copy
import inspect

import pytest
import torch

import metaopt
from metaopt.core import step_needs
from metaopt.learned import LEARNED_NAMES

# name -> hyper-parameters suited to the problem below (a well-conditioned least squares, 40 steps)
HPARAMS = {
    "sgd": dict(lr=0.1), "momentum": dict(lr=0.05), "nesterov": dict(lr=0.05), "adam": dict(lr=0.05),
    "rmsprop": dict(lr=0.01), "adagrad": dict(lr=0.1), "adadelta": dict(lr=1.0),
    "sgd-hd": dict(lr=0.05, hypergrad_lr=1e-3), "sgdn-hd": dict(lr=0.05, hypergrad_lr=1e-3),
    "adam-hd": dict(lr=0.05, hypergrad_lr=1e-4),
    "hd-val": dict(lr=0.05, base="sgd"), "rtho": dict(lr=0.05, base="sgd"), "marthe": dict(lr=0.05, base="sgd"),
    "cam-hd-sgd": dict(lr=0.05), "cam-hd-sgdn": dict(lr=0.05), "cam-hd-adam": dict(lr=0.05, hypergrad_lr=1e-4),
    "tlr": dict(lr=0.05), "tlr-pl": dict(lr=0.05), "tlr-naive": dict(lr=0.05, eta=1e-3),
    # the parameter-free baselines (metaopt.external): their defaults, except where 40 steps are too few for the
    # default's warm start (DoG's first step is reps_rel * (1 + |x0|); Schedule-Free's lr is Adam-like) and D-Adapt
    # Adam's bias correction (off by default: without it the D estimate overshoots this problem within 40 steps)
    "schedule-free-adamw": dict(lr=0.05), "prodigy": {}, "d-adapt-adam": dict(use_bias_correction=True),
    "dog": dict(reps_rel=1e-2), "mechanic-adam": {},
}
# (name, test) pairs a package itself does not support, with the reason (metaopt.external's docstring); strict: the
# test runs and must fail, so a package release that fixes it shows up here
PACKAGE_LIMITS = {
    ("mechanic-adam", "test_state_dict_resume_is_exact"): "mechanic_pytorch keys its reference points by the "
    "parameter tensors themselves, so its state_dict does not resume an optimizer over other tensors",
}


def names_for(test):
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=PACKAGE_LIMITS[(n, test)]))
            if (n, test) in PACKAGE_LIMITS else n for n in HAND_DESIGNED]
HAND_DESIGNED = [n for n in metaopt.OPTIMIZERS if n not in LEARNED_NAMES]


def test_every_registered_optimizer_is_in_the_table():
    assert sorted(HAND_DESIGNED) == sorted(HPARAMS)


@pytest.mark.parametrize("name", list(metaopt.OPTIMIZERS))
def test_the_declared_step_needs_match_the_step(name):
    """metaopt.core.step_needs reads what a class declares (requires_closure, accepts_val_closure) instead of
    inspecting its step; the declaration must be true of the signature."""
    model, _, _ = problem()
    opt = metaopt.make_optimizer(name, model.named_parameters(), **HPARAMS.get(name, {}))
    closure, val_closure = step_needs(opt)
    parameters = inspect.signature(opt.step).parameters
    assert not closure or "closure" in parameters
    assert val_closure == ("val_closure" in parameters)
    assert closure == (name in ("marthe", "rtho", "hd-val", "tlr-naive", "marthe-learned-mu"))


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(5, 2, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(64, 2, generator=gen,
                                                                                         dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Linear(5, 2).double()
    return model, x, y


def train(name, steps, opt=None, model=None, start=0):
    model_, x, y = problem()
    model = model or model_
    opt = opt or metaopt.make_optimizer(name, model.named_parameters(), **HPARAMS[name])
    losses = []
    for t in range(start, start + steps):
        rows = slice((8 * t) % 64, (8 * t) % 64 + 32)

        def closure():
            return torch.nn.functional.mse_loss(model(x[rows]), y[rows])

        if step_needs(opt)[0]:
            loss = opt.step(closure)
        else:
            opt.zero_grad()
            loss = closure()
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        assert all(torch.isfinite(p).all() for p in model.parameters()), f"{name}: non-finite parameters"
    return model, opt, losses


@pytest.mark.parametrize("name", HAND_DESIGNED)
def test_loss_falls_and_updates_stay_finite(name):
    _, _, losses = train(name, 40)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, f"{name}: {losses[:3]} ... {losses[-3:]}"


@pytest.mark.parametrize("name", HAND_DESIGNED)
def test_state_shapes_are_stable(name):
    _, opt, _ = train(name, 3)

    def shapes():
        return {k: {f: tuple(v.shape) for f, v in st.items() if torch.is_tensor(v)}
                for k, st in opt.state_dict()["state"].items() if isinstance(st, dict)}  # DoG adds a flag

    before = shapes()
    train(name, 5, opt=opt, model=_model_of(opt), start=3)
    assert shapes() == before


def _model_of(opt):
    """A module view over the optimizer's parameters (weight, bias) so train() can keep stepping them."""
    weight, bias = opt.param_groups[0]["params"]
    model = torch.nn.Linear(5, 2).double()
    model.weight, model.bias = weight, bias
    return model


@pytest.mark.parametrize("name", names_for("test_state_dict_resume_is_exact"))
def test_state_dict_resume_is_exact(name):
    straight, _, _ = train(name, 10)
    model, opt, _ = train(name, 5)
    saved = copy.deepcopy(opt.state_dict())
    fresh = metaopt.make_optimizer(name, model.named_parameters(), **HPARAMS[name])
    fresh.load_state_dict(saved)
    train(name, 5, opt=fresh, model=model, start=5)
    for p, q in zip(straight.parameters(), model.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", HAND_DESIGNED)
def test_cuda_matches_cpu(name):
    """The same float64 run on CUDA agrees with the CPU run (to rounding: kernels may fuse differently)."""
    cpu, _, cpu_losses = train(name, 10)
    model, x, y = problem()
    model = model.cuda()
    opt = metaopt.make_optimizer(name, model.named_parameters(), **HPARAMS[name])
    x, y = x.cuda(), y.cuda()
    for t in range(10):
        rows = slice((8 * t) % 64, (8 * t) % 64 + 32)

        def closure():
            return torch.nn.functional.mse_loss(model(x[rows]), y[rows])

        if getattr(opt, "requires_closure", False):
            opt.step(closure)
        else:
            opt.zero_grad()
            closure().backward()
            opt.step()
    for p, q in zip(cpu.parameters(), model.parameters()):
        assert torch.allclose(p, q.cpu(), rtol=1e-9, atol=1e-12), name
