"""The contract every registered hand-designed optimizer keeps (registry-driven: a new optimizer is one registry
record, metaopt.registry, whose ``test_hparams`` the tests below run it with).

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
from metaopt.hypergrad.hd import AdamHD
from metaopt.hypergrad.marthe import Marthe
from metaopt.hypergrad.tlr import NaiveTLR
from metaopt.registry import KINDS, StepNeeds, record, records, register_optimizer

# name -> hyper-parameters suited to the problem below (a well-conditioned least squares, 40 steps): each
# hand-designed record's test_hparams (stated, with why, at its registration)
HPARAMS = {entry.name: dict(entry.test_hparams) for entry in records() if entry.kind != "learned"}
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


def test_every_registered_name_has_a_record():
    assert tuple(entry.name for entry in records()) == metaopt.OPTIMIZERS
    for name in metaopt.OPTIMIZERS:
        entry = record(name)
        assert entry.name == name and entry.kind in KINDS
        assert (entry.kind == "learned") == (name in LEARNED_NAMES)
    with pytest.raises(ValueError, match="Unknown optimizer 'not-an-optimizer'. Valid names: sgd, "):
        record("not-an-optimizer")


@pytest.mark.parametrize("name", list(metaopt.OPTIMIZERS))
def test_the_declared_step_needs_match_the_step(name):
    """metaopt.core.step_needs and the record's ``needs`` read what a class declares (requires_closure,
    accepts_val_closure) instead of inspecting its step; the declaration must be true of the signature, and the record
    must build an instance of the class it reads it from."""
    entry = record(name)
    model, _, _ = problem()
    opt = metaopt.make_optimizer(name, model.named_parameters(), **entry.test_hparams)
    assert isinstance(opt, entry.builds)
    closure, val_closure = step_needs(opt)
    assert (closure, val_closure) == (entry.needs.closure, entry.needs.val_closure)
    parameters = inspect.signature(opt.step).parameters
    assert not closure or "closure" in parameters
    assert val_closure == ("val_closure" in parameters)
    assert closure == (name in ("marthe", "rtho", "hd-val", "tlr-naive", "marthe-learned-mu"))
    assert entry.needs == {"marthe": StepNeeds.CLOSURE_AND_VALIDATION, "rtho": StepNeeds.CLOSURE_AND_VALIDATION,
                           "hd-val": StepNeeds.CLOSURE_AND_VALIDATION, "marthe-learned-mu":
                           StepNeeds.CLOSURE_AND_VALIDATION, "tlr-naive": StepNeeds.CLOSURE}.get(name,
                                                                                                 StepNeeds.NOTHING)


def test_step_needs_of_an_optimizer_built_from_its_class():
    """Without the registry: the class's declaration answers (the record of a name built from it reads the same)."""
    model, _, _ = problem()
    assert step_needs(Marthe(model.parameters(), lr=0.05)) == (True, True)
    assert step_needs(NaiveTLR(model.parameters())) == (True, False)
    assert step_needs(AdamHD(model.parameters())) == (False, False)
    assert step_needs(torch.optim.SGD(model.parameters(), lr=0.1)) == (False, False)


def test_a_registration_states_a_valid_record():
    with pytest.raises(ValueError, match="Invalid kind 'clever' for optimizer 'x'; valid kinds: classic, "):
        register_optimizer("x", kind="clever", test_hparams={})
    with pytest.raises(TypeError, match="name the class it builds"):
        register_optimizer("x", kind="classic", test_hparams={})(lambda params: torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="'sgd' is already registered"):
        register_optimizer("sgd", kind="classic", test_hparams={})(torch.optim.SGD)
    assert "x" not in metaopt.registry.registered_names()


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
