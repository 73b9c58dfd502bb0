"""The parameter-free baselines of metaopt.external: each face is its package's optimizer step for step, adds only
the non-finite guard, and the two that evaluate elsewhere (Schedule-Free's x, DoG's average) switch modes, survive a
state_dict round trip and are evaluated in eval mode by the harness. The registry-wide contract (loss falls, stable
state, exact resume) is tests/test_contract.py."""

import copy

import pytest
import torch

import meta_tasks
import metaopt
from metaopt.evaluate.runner import seeded_generators, train
from metaopt.external import EXTERNAL_NAMES, evaluation_mode

dog_package = pytest.importorskip("dog")
schedulefree = pytest.importorskip("schedulefree")
prodigyopt = pytest.importorskip("prodigyopt")
dadaptation = pytest.importorskip("dadaptation")
mechanic_pytorch = pytest.importorskip("mechanic_pytorch")


def problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(5, 2, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    return torch.nn.Linear(5, 2).double(), x, y


def tensors_of(state_dict):
    """Every tensor of an optimizer's state_dict (per-parameter state, nested package state, param-group values),
    in a fixed order: the packages keep state in their own layouts (DoG in param_groups, Mechanic nested)."""
    from torch.utils._pytree import tree_leaves

    def leaves(x):
        if isinstance(x, dict):  # Mechanic's dict is keyed by tensors: order by insertion, values only
            return [leaf for v in x.values() for leaf in leaves(v)]
        return [leaf for leaf in tree_leaves(x) if torch.is_tensor(leaf)]

    groups = [{k: v for k, v in g.items() if k != "params"} for g in state_dict["param_groups"]]
    return leaves(state_dict["state"]) + leaves(groups)


def run(model, opt, x, y, steps, start=0):
    for t in range(start, start + steps):
        rows = slice((8 * t) % 64, (8 * t) % 64 + 32)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()


def bare(name, params):
    """The package's own optimizer at the same defaults, without metaopt."""
    if name == "schedule-free-adamw":
        opt = schedulefree.AdamWScheduleFree(params)
        opt.train()
        return opt
    if name == "prodigy":
        return prodigyopt.Prodigy(params)
    if name == "d-adapt-adam":
        return dadaptation.DAdaptAdam(params)
    if name == "dog":
        return dog_package.DoG(params)
    return mechanic_pytorch.mechanize(torch.optim.Adam)(params, lr=1.0)


def test_names_are_registered_with_their_packages_classes():
    assert set(EXTERNAL_NAMES) <= set(metaopt.OPTIMIZERS)
    model, _, _ = problem()
    classes = {"schedule-free-adamw": schedulefree.AdamWScheduleFree, "prodigy": prodigyopt.Prodigy,
               "d-adapt-adam": dadaptation.DAdaptAdam, "dog": dog_package.DoG,
               "mechanic-adam": mechanic_pytorch.Mechanic}
    for name, cls in classes.items():
        assert isinstance(metaopt.make_optimizer(name, model.parameters()), cls), name


@pytest.mark.parametrize("name", EXTERNAL_NAMES)
def test_face_is_the_package_step_for_step(name):
    """Same defaults, same arithmetic: metaopt's face equals the bare package over 15 steps in float64, exactly."""
    ours, x, y = problem()
    theirs = copy.deepcopy(ours)
    run(ours, metaopt.make_optimizer(name, ours.parameters()), x, y, 15)
    run(theirs, bare(name, theirs.parameters()), x, y, 15)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(ours.weight, problem()[0].weight), f"{name}: did not move"


@pytest.mark.parametrize("name", EXTERNAL_NAMES)
def test_nonfinite_gradient_is_skipped_counted_and_raised_on_request(name):
    model, x, y = problem()
    opt = metaopt.make_optimizer(name, model.parameters())
    run(model, opt, x, y, 3)
    before = [p.clone() for p in model.parameters()], tensors_of(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[0]))
    after = tensors_of(opt.state_dict())
    assert len(after) == len(before[1]) and all(torch.equal(a, b) for a, b in zip(after, before[1]))
    assert opt.param_groups[0]["nonfinite_skipped"] == 1
    raising = metaopt.make_optimizer(name, model.parameters(), nonfinite="raise")
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        raising.step()
    with pytest.raises(ValueError, match="nonfinite"):
        metaopt.make_optimizer(name, model.parameters(), nonfinite="maybe")


@pytest.mark.parametrize("name", EXTERNAL_NAMES)
def test_the_packages_alone_do_not_guard(name):
    """Why the guard exists: fed one NaN gradient, the bare package writes NaN into the parameters or its state
    (DoG also raises, with the NaN already in its gradient sum)."""
    model, x, y = problem()
    opt = bare(name, model.parameters())
    run(model, opt, x, y, 3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.weight.grad[0, 0] = float("nan")
    try:
        with torch.no_grad():
            opt.step()
    except AssertionError as err:  # DoG asserts on its gradient sum, after adding the NaN to it
        assert name == "dog" and "not strictly positive" in str(err)
    tensors = [*model.parameters(), *tensors_of(opt.state_dict())]
    assert any(not torch.isfinite(t).all() for t in tensors), name


def test_make_optimizer_checks_their_hyperparameters():
    model, _, _ = problem()
    with pytest.raises(ValueError, match="Unknown hyper-parameter 'lrr'.*lr"):
        metaopt.make_optimizer("prodigy", model.parameters(), lrr=1.0)
    with pytest.raises(ValueError, match="Invalid d0.*expected float"):
        metaopt.make_optimizer("d-adapt-adam", model.parameters(), d0="small")


def test_schedule_free_evaluates_at_its_average_and_resumes_in_train_mode():
    model, x, y = problem()
    opt = metaopt.make_optimizer("schedule-free-adamw", model.parameters(), lr=0.05)
    run(model, opt, x, y, 10)
    y_weights = [p.clone() for p in model.parameters()]
    with evaluation_mode(opt):
        x_weights = [p.clone() for p in model.parameters()]
        assert opt.param_groups[0]["train_mode"] is False
    assert opt.param_groups[0]["train_mode"] is True
    assert not all(torch.equal(a, b) for a, b in zip(x_weights, y_weights))      # x differs from y
    for p, q in zip(model.parameters(), y_weights):                               # and train() restores y
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["train_mode"] is True
    fresh = metaopt.make_optimizer("schedule-free-adamw", model.parameters(), lr=0.05)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["train_mode"] is True


def test_dog_averages_with_the_packages_averager_and_swaps_it_in_for_eval():
    model, x, y = problem()
    opt = metaopt.make_optimizer("dog", model.parameters(), reps_rel=1e-2)
    theirs = copy.deepcopy(model)
    their_opt = dog_package.DoG(theirs.parameters(), reps_rel=1e-2)
    averager = dog_package.PolynomialDecayAverager(theirs)
    for t in range(12):
        run(model, opt, x, y, 1, start=t)
        run(theirs, their_opt, x, y, 1, start=t)
        averager.step()
    iterate = [p.clone() for p in model.parameters()]
    with evaluation_mode(opt):
        for p, q in zip(model.parameters(), averager.averaged_model.parameters()):
            assert torch.equal(p, q)                                              # the package's average
        with pytest.raises(RuntimeError, match="eval mode"):
            opt.step()
        with pytest.raises(RuntimeError, match="eval mode"):
            opt.state_dict()
    for p, q, r in zip(model.parameters(), iterate, theirs.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)                            # the iterate is back

    # the average survives a round trip into a fresh optimizer over the same tensors
    saved = copy.deepcopy(opt.state_dict())
    fresh = metaopt.make_optimizer("dog", model.parameters(), reps_rel=1e-2)
    fresh.load_state_dict(saved)
    run(model, opt, x, y, 3, start=12)
    moved = [p.clone() for p in model.parameters()]
    with evaluation_mode(opt):
        expected = [p.clone() for p in model.parameters()]
    with torch.no_grad():
        for p, q in zip(model.parameters(), iterate):
            p.copy_(q)
    run(model, fresh, x, y, 3, start=12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), moved))
    with evaluation_mode(fresh):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))


def test_without_averaging_dog_is_the_bare_iterate():
    model, _, _ = problem()
    opt = metaopt.make_optimizer("dog", model.parameters(), averaging=False)
    assert not hasattr(opt, "eval")


def test_evaluation_leaves_other_optimizers_alone():
    model, _, _ = problem()
    opt = metaopt.make_optimizer("adam", model.parameters())
    before = [p.clone() for p in model.parameters()]
    with evaluation_mode(opt):
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_harness_takes_held_out_metrics_in_eval_mode():
    """runner.train evaluates Schedule-Free at x: its test loss equals the loss at the package's eval() weights,
    not at the training iterate y."""
    task = meta_tasks.get_task("quadratic", dim=10)
    result = train(task, "schedule-free-adamw", {"lr": 0.05}, seed=0, steps=20, splits=("test",))
    init_gen = torch.Generator(device=task.device).manual_seed(0)
    params = {n: p.requires_grad_() for n, p in task.init(init_gen).items()}
    opt = metaopt.make_optimizer("schedule-free-adamw", list(params.items()), lr=0.05)
    _, batch_gen = seeded_generators(0, task.device)
    for _ in range(20):
        batch = task.sample_batch(batch_gen)
        opt.zero_grad()
        task.loss(params, batch).backward()
        opt.step()
    with torch.no_grad():
        at_y = task.evaluate({n: p.detach() for n, p in params.items()}, "test")["loss"]
        opt.eval()
        at_x = task.evaluate({n: p.detach() for n, p in params.items()}, "test")["loss"]
    assert result.test["loss"] == pytest.approx(at_x, rel=1e-6)
    assert at_x != pytest.approx(at_y, rel=1e-6)
