"""The learned CAM-HD γ and MARTHE μ rules: exact at init (step for step against the hand-designed optimizers),
meta-gradients (nonzero, finite differences), the unroll protocol (vmap == Python loop, oracles), frozen faces,
checkpoints, and a short MetaTrainer run of each preset."""

import copy
import math

import pytest
import torch
from helpers import assert_nonfinite_step_is_skipped
from torch.utils._pytree import tree_leaves, tree_map, tree_structure

import meta_tasks
import metaopt
from meta_tasks.base import FixedFamily
from meta_tasks.tasks import QuadraticTask
from metaopt.learned import from_pretrained
from metaopt.learned.rules import LearnedGammaCAMHD, LearnedMuMARTHE, LearnedRuleState, MirroredMLP, h_mu
from metaopt.meta import MetaTrainer, Slot, preset, unroll
from metaopt.tree import stack

F64 = torch.float64
HAS_FASHION = meta_tasks.datasets.find_dataset("fashion-mnist") is not None
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST not found (meta_tasks.datasets)")


def mlp(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def batches(n, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype))
            for _ in range(n)]


def mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def train(model, opt, data):
    for batch in data:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.step()


def train_marthe(model, opt, train_data, val_data):
    for tb, vb in zip(train_data, val_data):
        opt.step(lambda tb=tb: mse(model, tb), lambda vb=vb: mse(model, vb))


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def gamma_rule(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(kw.pop("seed", 0))
        return LearnedGammaCAMHD(**kw)


def mu_rule(**kw):
    with torch.random.fork_rng():
        torch.manual_seed(kw.pop("seed", 0))
        return LearnedMuMARTHE(**kw)


def quadratic(seed=0, dim=6, dtype=F64):
    task = QuadraticTask.sample(torch.Generator().manual_seed(seed), dim=dim)
    return QuadraticTask(task.W.to(dtype), task.y.to(dtype))


def slot(lopt, task, seed=0):
    params = {n: p.to(task.W.dtype) for n, p in task.init(torch.Generator().manual_seed(seed)).items()}
    return Slot(seed, task, params, lopt.init(params), 0, torch.Generator().manual_seed(seed))


def advanced(lopt, s, steps, **kw):
    """The slot after ``steps`` inner steps (detached): an instance further along its horizon."""
    out = unroll(lopt, [s], steps, **kw)
    state = tree_map(torch.Tensor.detach, out.opt_states[0])
    return Slot(s.instance_seed, s.task, {n: p.detach() for n, p in out.params[0].items()}, state, steps, s.batch_gen)


def meta_grads(lopt, loss):
    grads = torch.autograd.grad(loss, list(lopt.parameters()), allow_unused=True)
    return dict(zip([n for n, _ in lopt.named_parameters()], grads))


def assert_all_nonzero_finite(grads):
    for name, g in grads.items():
        assert g is not None, f"{name} gets no meta-gradient"
        assert torch.isfinite(g).all(), f"{name}: non-finite meta-gradient"
        assert g.abs().sum() > 0, f"{name}: zero meta-gradient"


# ---------------------------------------------------------------------------------------------------------------------
# Exact at init


def test_mirrored_network_is_exactly_zero_at_init_and_every_weight_has_a_gradient():
    net = MirroredMLP(6, 8, 3).double()
    x = torch.randn(10, 6, dtype=F64)
    out = net(x)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), list(net.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("levels,gamma0", [(("parameter", "layer", "global"), (0.3, 0.3, 0.4)),
                                           (("unit", "global"), (0.2, 0.8))])
def test_gamma_network_gives_the_paper_gamma_exactly_at_init(levels, gamma0):
    lopt = gamma_rule(levels=levels)
    assert lopt.gamma0 == gamma0
    for seed in range(5):
        x = 3 * torch.randn(lopt.num_features, dtype=F64, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(lopt.gamma_weights(x), torch.tensor(gamma0, dtype=F64))


HAND_DESIGNED_CAM_HD = {"sgd": "cam-hd-sgd", "sgdn": "cam-hd-sgdn", "adam": "cam-hd-adam"}


@pytest.mark.parametrize("base", ["adam", "sgd", "sgdn"])
def test_cam_hd_learned_gamma_equals_cam_hd_with_fixed_gamma_step_for_step(base):
    """At θ init the frozen face is the hand-designed cam-hd-<base> with the paper's γ fixed (δ = 0)."""
    beta = 1e-3 if base == "adam" else 0.05  # large enough for the levels' rates to separate within the run
    lopt = gamma_rule(base=base, hypergrad_lr=beta)
    ours, ref = mlp(), mlp()
    opt = lopt.frozen(ours.named_parameters(), lr=0.01)
    ref_opt = metaopt.make_optimizer(HAND_DESIGNED_CAM_HD[base], ref.named_parameters(), lr=0.01, hypergrad_lr=beta,
                                     gamma_lr=0.0)
    # Adam's rates stay within a factor 2 of α_0 here, where the state's α − α_0 round trip is exact: bit for bit
    tol = dict(rtol=0.0, atol=0.0) if base == "adam" else dict(rtol=1e-13, atol=1e-16)
    for batch in batches(12, seed=3):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            mse(model, batch).backward()
            o.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **tol)
    group, ref_group = opt.param_groups[0], ref_opt.param_groups[0]
    assert group["gamma"] == ref_group["gamma"] == [0.3, 0.3, 0.4]
    assert group["step"] == 12
    rates = group["alpha_layer"]
    assert rates == pytest.approx(ref_group["alpha_layer"], rel=1e-13)
    assert not rates == pytest.approx([0.01, 0.01], rel=1e-6)  # the rates did adapt


@pytest.mark.parametrize("base", ["momentum", "sgd", "adam"])
def test_marthe_learned_mu_equals_marthe_step_for_step(base):
    """At θ init the frozen face (the marthe face with the network as mu_rule) is marthe, bit for bit."""
    kw = dict(lr=0.05, hypergrad_lr=1e-3, adapt_hypergrad_lr=1e-2, base=base, weight_decay=1e-3)
    lopt = mu_rule(**kw)
    ours, ref = mlp(), mlp()
    opt = lopt.frozen(ours.parameters())
    ref_opt = metaopt.make_optimizer("marthe", ref.parameters(), **kw)
    train_data, val_data = batches(10, seed=4), batches(10, seed=5)
    dampings = []
    for tb, vb in zip(train_data, val_data):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.step(lambda: mse(model, tb), lambda: mse(model, vb))
        assert same(ours, ref)
        for key in ("lr", "hypergrad_lr", "damping", "horizon", "delta_lr"):
            assert opt.param_groups[0][key] == ref_opt.param_groups[0][key], key
        dampings.append(opt.param_groups[0]["damping"])
    assert opt.requires_closure and opt.param_groups[0]["hvp_evals"] > 0
    assert len(set(dampings)) > 1 or dampings[-1] == 1.0  # h_μ acted


def _functional_marthe(lopt, model, train_data, val_data, *, oracles=True):
    """The functional update driven by hand: H·Z and ∇E(w_t) by autograd, one call per step."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = lopt.init(params)
    call = lambda p, b: mse_functional(model, p, b)  # noqa: E731
    pending_val = None
    for i, tb in enumerate(train_data):
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        loss = call(leaves, tb)
        g = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        hz = torch.autograd.grad(g, list(leaves.values()), grad_outputs=[lopt.hvp_vectors(state)[n] for n in leaves])
        kw = dict(hvp=dict(zip(leaves, hz)))
        if oracles:
            e = torch.autograd.grad(call(leaves, pending_val), list(leaves.values())) if pending_val else g
            kw["val_grads"] = dict(zip(leaves, (x.detach() for x in e)))
        updates, state = lopt.update(dict(zip(leaves, (x.detach() for x in g))), state,
                                     {n: p.detach() for n, p in leaves.items()}, **kw)
        params = {n: params[n] + updates[n] for n in params}
        pending_val = val_data[i] if i < len(val_data) else None
    return params, state


def mse_functional(model, params, batch):
    return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (batch[0],)), batch[1])


@pytest.mark.parametrize("base", ["momentum", "adam"])
def test_functional_update_with_oracles_equals_the_marthe_face(base):
    """The meta-training path (update with hvp= and val_grads=, the hyper-step of step t−1 run at the start of call t)
    follows marthe's trajectory."""
    kw = dict(lr=0.05, hypergrad_lr=1e-3, adapt_hypergrad_lr=1e-2, base=base)
    lopt = mu_rule(**kw)
    model, ref = mlp(), mlp()
    ref_opt = metaopt.make_optimizer("marthe", ref.parameters(), **kw)
    train_data, val_data = batches(8, seed=6), batches(8, seed=7)
    train_marthe(ref, ref_opt, train_data, val_data)
    params, _ = _functional_marthe(lopt, model, train_data, val_data)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(params[n], p.detach(), rtol=1e-10, atol=1e-13)
    # call t+1 finishes step t (∇E on validation batch t): one more call, its own step ignored, completes step 8
    _, state = _functional_marthe(lopt, model, train_data + train_data[:1], val_data)
    group = ref_opt.param_groups[0]
    scalar = lambda value: float(value.detach())  # noqa: E731
    assert scalar(state.rule.lr) == pytest.approx(group["lr"], rel=1e-10)
    assert scalar(state.rule.damping) == pytest.approx(group["damping"], rel=1e-10, abs=1e-12)
    assert scalar(state.rule.horizon) == pytest.approx(group["horizon"], rel=1e-10)
    assert group["lr"] != 0.05 and 0 < group["horizon"]  # η and the horizon counter did move


def test_oracle_free_update_is_marthe_next_batch_with_zero_curvature_term():
    """Without val_grads the objective is the next training batch (marthe's hyper_objective="next-batch"); with the
    exact H·Z supplied it follows that face."""
    kw = dict(lr=0.05, hypergrad_lr=1e-3, adapt_hypergrad_lr=1e-2, base="momentum")
    lopt = mu_rule(**kw)
    model, ref = mlp(), mlp()
    ref_opt = metaopt.make_optimizer("marthe", ref.parameters(), hyper_objective="next-batch", **kw)
    data = batches(6, seed=8)
    for tb in data:
        ref_opt.step(lambda tb=tb: mse(ref, tb))
    params, _ = _functional_marthe(lopt, model, data, data, oracles=False)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(params[n], p.detach(), rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------------
# The state: the hand-designed rule's own (every leaf a tensor) and the rate it refers to


@pytest.mark.parametrize("base", ["adam", "sgd", "sgdn"])
def test_gamma_face_is_cam_hd_bit_for_bit_where_the_rates_leave_a_factor_2_of_the_initial_rate(base):
    """The state holds CamHDRule's rates as they are (no α − α_0 round trip) and the face steps to the rule's own new
    parameters, so at θ init the learned face is cam-hd-<base> with δ = 0 exactly, however far the rates move."""
    beta = 0.05 if base == "adam" else 0.5
    lopt = gamma_rule(base=base, hypergrad_lr=beta)
    ours, ref = mlp(), mlp()
    opt = lopt.frozen(ours.named_parameters(), lr=0.01)
    ref_opt = metaopt.make_optimizer(HAND_DESIGNED_CAM_HD[base], ref.named_parameters(), lr=0.01, hypergrad_lr=beta,
                                     gamma_lr=0.0)
    for batch in batches(20, seed=3):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            mse(model, batch).backward()
            o.step()
        assert same(ours, ref)
    group, ref_group = opt.param_groups[0], ref_opt.param_groups[0]
    for key in ("step", "gamma", "gamma_grad", "alpha_unit", "alpha_layer", "alpha_global", "negative_lr_steps"):
        assert group[key] == ref_group[key], key
    rates = group["alpha_layer"] + [group["alpha_global"]]
    assert any(not 0.01 / 2 <= r <= 2 * 0.01 for r in rates)  # where the old α − α_0 layout rounded
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(opt.state[p]["alpha_param"], ref_opt.state[q]["alpha_param"])


def test_gamma_face_follows_an_lr_schedule_as_cam_hd_does():
    """``lr`` is α_0; a scheduler that changes it scales every level's rate by new / old at the next step, as
    cam-hd-*'s face does: at θ init the two stay equal through the schedule."""
    lopt = gamma_rule(base="sgdn", hypergrad_lr=0.05)
    ours, ref = mlp(), mlp()
    opt = lopt.frozen(ours.named_parameters(), lr=0.01)
    ref_opt = metaopt.make_optimizer("cam-hd-sgdn", ref.named_parameters(), lr=0.01, hypergrad_lr=0.05, gamma_lr=0.0)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.3) for o in (opt, ref_opt)]
    for batch in batches(10, seed=5):
        for model, o, schedule in ((ours, opt, schedules[0]), (ref, ref_opt, schedules[1])):
            o.zero_grad()
            mse(model, batch).backward()
            o.step()
            schedule.step()
        torch.testing.assert_close(list(ours.parameters()), list(ref.parameters()), rtol=1e-15, atol=0.0)
    group, ref_group = opt.param_groups[0], ref_opt.param_groups[0]
    assert group["lr_seen"] == ref_group["lr_seen"] == group["lr"] < 0.01 * 0.3**2  # three cuts seen
    assert group["alpha_layer"] == pytest.approx(ref_group["alpha_layer"], rel=1e-15)
    assert group["alpha_global"] == pytest.approx(ref_group["alpha_global"], rel=1e-15)


STATE_CASES = {
    "gamma-adam": (lambda: gamma_rule(base="adam", hypergrad_lr=1e-3), {}),
    "gamma-sgdn-unit-global": (lambda: gamma_rule(base="sgdn", hypergrad_lr=1e-5, levels=("unit", "global")), {}),
    "mu-momentum": (lambda: mu_rule(base="momentum", lr=0.002, hypergrad_lr=1e-6, adapt_hypergrad_lr=None), {}),
    "mu-adam": (lambda: mu_rule(base="adam", lr=0.01, hypergrad_lr=1e-4), {}),
}


@pytest.mark.parametrize("case", STATE_CASES)
def test_the_state_is_a_stable_pytree_of_tensors_whose_rates_start_at_the_first_steps_lr(case):
    make, kw = STATE_CASES[case]
    lopt = make().double()
    s = slot(lopt, quadratic(seed=2, dim=6), 0)
    init = s.opt_state
    assert isinstance(init, LearnedRuleState) and float(init.lr_seen) == 1.0  # init knows no rate
    assert all(isinstance(x, torch.Tensor) for x in tree_leaves(init))  # None and Python numbers do not stack
    lr = 0.003  # not the optimizer's own lr: the first step starts from exactly this rate
    first = unroll(lopt, [s], 1, lr=lr, **kw).opt_states[0]
    if case.startswith("gamma"):  # h_1 = 0: every level still at α_0 after step 1
        for level, rates in metaopt.hypergrad.cam_hd.level_rates(first.rule, lopt.levels).items():
            for r in (rates.values() if level == "parameter" else [rates]):
                assert torch.equal(r, torch.full_like(r, lr))
        if "parameter" not in lopt.levels:  # an unused level: an empty tensor where CamHDRule keeps None
            assert first.rule.alpha_param.shape == (0,) and first.rule.alpha_layer.shape == (0,)
    else:  # the first call has no pending hyper-step: η_1 = η_0
        assert float(first.rule.lr) == lr
    out = unroll(lopt, [s], 3, lr=lr, **kw).opt_states[0]
    assert float(out.lr_seen) == lr and int(out.rule.step) == 3 and out.rule.step.dtype == torch.int64
    assert tree_structure(out) == tree_structure(init)
    assert [(x.shape, x.dtype) for x in tree_leaves(out)] == [(x.shape, x.dtype) for x in tree_leaves(init)]
    carried = tree_map(torch.Tensor.detach, out)  # the truncation boundary is one tree_map
    stacked = stack([init, carried])  # a fresh instance stacks with one further along
    assert tree_structure(stacked) == tree_structure(init)


# ---------------------------------------------------------------------------------------------------------------------
# Meta-gradients through the unroll


def test_every_theta_gets_a_nonzero_meta_gradient_through_the_unroll():
    task = quadratic(dtype=torch.float32)
    gamma_lopt = gamma_rule(hypergrad_lr=1e-4)
    out = unroll(gamma_lopt, [slot(gamma_lopt, task, 0), slot(gamma_lopt, task, 1)], 6, lr=1e-2)
    assert_all_nonzero_finite(meta_grads(gamma_lopt, out.meta_losses.sum()))

    # a fixed β: on this quadratic (Δη ~ 1e2) the adaptive β of the defaults diverges (MARTHE's advice: lower it)
    mu_lopt = mu_rule(base="sgd", lr=0.005, hypergrad_lr=1e-5, adapt_hypergrad_lr=None)
    out = unroll(mu_lopt, [slot(mu_lopt, task, 0), slot(mu_lopt, task, 1)], 6, lr=0.005, meta_loss="val")
    assert_all_nonzero_finite(meta_grads(mu_lopt, out.meta_losses.sum()))


@needs_fashion
def test_mu_rule_meta_gradient_on_a_fashion_mnist_mlp_with_a_validation_split():
    task = meta_tasks.get_task("mlp-sigmoid", batch_size=16)
    lopt = mu_rule(lr=0.1, hypergrad_lr=1e-4)
    slots = [Slot(i, task, task.init(torch.Generator().manual_seed(i)), None, 0, torch.Generator().manual_seed(i))
             for i in range(2)]
    slots = [Slot(s.instance_seed, s.task, s.params, lopt.init(s.params), 0, s.batch_gen) for s in slots]
    out = unroll(lopt, slots, 4, lr=0.1, meta_loss="val")
    assert_all_nonzero_finite(meta_grads(lopt, out.meta_losses.sum()))


def _perturb(lopt, scale=0.3, seed=5):
    """Move θ off init (the branches differ), as after some meta-training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lopt.net.branch_b.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return lopt


def _check_finite_differences(lopt, meta_loss_fn, coordinates, rel=1e-5):
    theta = dict(lopt.named_parameters())
    loss = meta_loss_fn()
    grads = meta_grads(lopt, loss)
    eps = 1e-6
    for name, index in coordinates:
        with torch.no_grad():
            theta[name][index] += eps
        up = float(meta_loss_fn().detach())
        with torch.no_grad():
            theta[name][index] -= 2 * eps
        down = float(meta_loss_fn().detach())
        with torch.no_grad():
            theta[name][index] += eps
        fd = (up - down) / (2 * eps)
        assert abs(fd) > 1e-9, f"{name}{index}: the check needs a sensitive coordinate"
        assert float(grads[name][index]) == pytest.approx(fd, rel=rel, abs=1e-12), f"{name}{index}"


def test_gamma_rule_meta_gradient_matches_finite_differences():
    with torch.random.fork_rng():
        torch.set_default_dtype(F64)
        try:
            lopt = _perturb(gamma_rule(base="adam", hypergrad_lr=0.05))
        finally:
            torch.set_default_dtype(torch.float32)
    task = quadratic(seed=1, dim=5)

    def meta_loss():
        return unroll(lopt, [slot(lopt, task, 2)], 6, lr=0.02, second_order=True).meta_losses.sum()

    _check_finite_differences(lopt, meta_loss, [("net.branch_a.0.weight", (0, 0)), ("net.branch_b.2.bias", (1,)),
                                                ("net.branch_a.2.weight", (2, 3))])


class TwoQuadratics(QuadraticTask):
    """Training loss ‖Wθ − y‖² and a different validation loss ‖Vθ − z‖² (the batch carries which split it is)."""

    def __init__(self, train: QuadraticTask, val: QuadraticTask):
        super().__init__(train.W, train.y)
        self.val_W, self.val_y = val.W, val.y

    def sample_batch(self, generator, split="train", batch_size=None):
        flag = torch.full((1,), 1.0 if split == "val" else 0.0, dtype=self.W.dtype)
        return meta_tasks.Batch(flag, flag)

    def loss(self, params, batch, buffers=None):
        s = batch.x[0]
        train, val = self.W @ params["theta"] - self.y, self.val_W @ params["theta"] - self.val_y
        return (1 - s) * (train * train).sum() + s * (val * val).sum()


def test_mu_rule_meta_gradient_matches_finite_differences():
    """Exact meta-gradient (second_order: gradients, H·Z and ∇E all differentiated) on a quadratic with a distinct
    validation objective; θ is moved off init so that μ lies inside (0, 1) (at the clip's edge the derivative is
    one-sided)."""
    with torch.random.fork_rng():
        torch.set_default_dtype(F64)
        try:
            lopt = mu_rule(base="sgd", lr=0.01, hypergrad_lr=1e-3, adapt_hypergrad_lr=None)
        finally:
            torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        lopt.net.branch_b[2].bias.add_(0.2)  # z = −0.2: μ = h_μ − 0.2 ∈ (0, 1) where h_μ is near 1
    both = TwoQuadratics(quadratic(seed=3, dim=5), quadratic(seed=4, dim=5))

    def meta_loss():
        return unroll(lopt, [slot(lopt, both, 2)], 6, lr=0.01, meta_loss="val", second_order=True).meta_losses.sum()

    _check_finite_differences(lopt, meta_loss, [("net.branch_a.0.weight", (1, 2)), ("net.branch_b.0.bias", (3,)),
                                                ("net.branch_a.2.weight", (0, 5))], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The unroll protocol: vmap equals the Python loop, also across instances at different steps


# Settings that keep ‖Wθ − y‖² (curvature up to ~1e2) stable: a divergent run would compare rounding noise.
@pytest.mark.parametrize("make,kw", [(lambda: gamma_rule(base="adam", hypergrad_lr=1e-3), dict(lr=0.01)),
                                     (lambda: gamma_rule(base="sgdn", hypergrad_lr=1e-5), dict(lr=0.002)),
                                     (lambda: mu_rule(base="momentum", lr=0.002, hypergrad_lr=1e-6,
                                                      adapt_hypergrad_lr=None), dict(lr=0.002, meta_loss="val")),
                                     (lambda: mu_rule(base="adam", lr=0.01, hypergrad_lr=1e-4), dict(lr=0.01))],
                         ids=["gamma-adam", "gamma-sgdn", "mu-momentum", "mu-adam"])
def test_vectorized_unroll_equals_the_python_loop(make, kw):
    lopt = make().double()
    task = quadratic(seed=2, dim=6)

    def slots():  # three instances, one of them 3 steps further along (Adam bases: unrolled as two groups)
        return [slot(lopt, task, 0), advanced(lopt, slot(lopt, task, 1), 3, **kw), slot(lopt, task, 2)]

    vec = unroll(lopt, slots(), 4, **kw)
    loop = unroll(lopt, slots(), 4, vectorized=False, **kw)
    assert torch.isfinite(vec.meta_losses).all()
    torch.testing.assert_close(vec.meta_losses, loop.meta_losses, rtol=1e-12, atol=0.0)
    g_vec, g_loop = meta_grads(lopt, vec.meta_losses.sum()), meta_grads(lopt, loop.meta_losses.sum())
    for name in g_vec:
        assert g_vec[name].abs().sum() > 0
        torch.testing.assert_close(g_vec[name], g_loop[name], rtol=1e-9, atol=1e-15)
    assert [int(s.rule.step) for s in vec.opt_states] == [4, 7, 4]
    assert lopt.static_step(slots()[1].opt_state) == (3 if lopt.base == "adam" else None)


def test_adam_base_under_vmap_without_the_step_count_is_a_clear_error():
    lopt = gamma_rule(base="adam")
    params = {"w": torch.randn(3, 4)}
    state = torch.func.vmap(lopt.init)(params)
    with pytest.raises(RuntimeError, match="static_step"):
        torch.func.vmap(lambda g, s, p: lopt.update(g, s, p))(params, state, params)


# ---------------------------------------------------------------------------------------------------------------------
# Frozen faces


def _gamma_face(model, lopt=None):
    lopt = lopt or gamma_rule(hypergrad_lr=1e-3)
    return lopt.frozen(model.named_parameters(), lr=0.01)


def _mu_face(model, lopt=None):
    lopt = lopt or mu_rule(lr=0.05, hypergrad_lr=1e-3, adapt_hypergrad_lr=1e-2)
    return lopt.frozen(model.parameters())


def test_frozen_faces_build_no_graph():
    model = mlp(torch.float32)
    opt = _gamma_face(model)
    train(model, opt, batches(3, 1, torch.float32))
    assert all(p.grad_fn is None for p in model.parameters())
    assert all(not v.requires_grad for st in opt.state.values() for v in st.values())
    assert not any(p.requires_grad for p in opt.lopt.parameters())
    model = mlp(torch.float32)
    opt = _mu_face(model)
    train_marthe(model, opt, batches(3, 1, torch.float32), batches(3, 2, torch.float32))
    assert all(p.grad_fn is None for p in model.parameters())
    assert all(not v.requires_grad for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert not any(p.requires_grad for p in opt.lopt.parameters())


@pytest.mark.parametrize("which", ["gamma", "mu"])
def test_frozen_face_state_dict_resume_is_bit_exact_in_float32(which):
    """float32 model: the float64 γ / rates must survive load_state_dict (torch casts per-parameter float state)."""
    lopt = _perturb(gamma_rule(hypergrad_lr=1e-3) if which == "gamma" else
                    mu_rule(lr=0.05, hypergrad_lr=1e-3, adapt_hypergrad_lr=1e-2))
    face = _gamma_face if which == "gamma" else _mu_face
    data, val = batches(10, 1, torch.float32), batches(10, 2, torch.float32)

    def run(model, opt, part):
        sl = slice(0, 5) if part == 0 else slice(5, 10)
        if which == "gamma":
            train(model, opt, data[sl])
        else:
            train_marthe(model, opt, data[sl], val[sl])

    straight = mlp(torch.float32)
    opt = face(straight, lopt)
    run(straight, opt, 0)
    run(straight, opt, 1)
    resumed = mlp(torch.float32)
    opt1 = face(resumed, lopt)
    run(resumed, opt1, 0)
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = face(resumed, lopt)
    opt2.load_state_dict(saved)
    run(resumed, opt2, 1)
    assert same(straight, resumed)
    if which == "gamma":
        assert opt.param_groups[0]["gamma"] != [0.3, 0.3, 0.4]  # perturbed θ: γ moved off γ₀ ...
        assert opt.param_groups[0]["gamma"] == opt2.param_groups[0]["gamma"]  # ... and resumed exactly


def test_frozen_faces_skip_nonfinite_steps():
    model = mlp(torch.float32)
    opt = _gamma_face(model)
    train(model, opt, batches(2, 1, torch.float32))
    group = dict(opt.param_groups[0])
    assert_nonfinite_step_is_skipped(model, opt, fill=0.0)
    assert opt.param_groups[0]["gamma"] == group["gamma"] and opt.param_groups[0]["step"] == group["step"]

    model = mlp(torch.float32)
    opt = _mu_face(model)
    train_marthe(model, opt, batches(2, 1, torch.float32), batches(2, 2, torch.float32))
    before = [p.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: mse(model, batches(1, 3, torch.float32)[0]) * float("nan"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.param_groups[0]["nonfinite_skipped"] == 1


def test_gamma_face_state_shapes_are_stable_and_unnamed_parameters_are_one_layer_each():
    model = mlp(torch.float32)
    opt = gamma_rule().frozen(model.parameters(), lr=0.01)
    train(model, opt, batches(1, 1, torch.float32))
    shapes = {k: {f: v.shape for f, v in st.items()} for k, st in opt.state_dict()["state"].items()}
    train(model, opt, batches(4, 2, torch.float32))
    assert shapes == {k: {f: v.shape for f, v in st.items()} for k, st in opt.state_dict()["state"].items()}
    assert len(opt.param_groups[0]["alpha_layer"]) == 4  # as cam-hd-* given model.parameters()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    mse(model, batches(1, 3, torch.float32)[0]).backward()
    model[2].bias.grad = None  # a parameter without a gradient changes the layer groupings: a clear error
    with pytest.raises(ValueError, match="parameter set changed"):
        opt.step()


@pytest.mark.parametrize("which", ["gamma", "mu"])
def test_save_pretrained_from_pretrained_round_trip(which, tmp_path):
    lopt = _perturb(gamma_rule(base="sgdn", hidden=8) if which == "gamma" else mu_rule(base="adam", hidden=4))
    lopt.save_pretrained(tmp_path / "ckpt", card="# card\n")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(lopt) and loaded.config == lopt.config
    for (n, p), (m, q) in zip(lopt.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(p, q)
    a, b = mlp(torch.float32), mlp(torch.float32)
    if which == "gamma":
        train(a, lopt.frozen(a.named_parameters()), batches(4, 1, torch.float32))
        train(b, metaopt.make_optimizer(str(tmp_path / "ckpt"), b.named_parameters()), batches(4, 1, torch.float32))
    else:
        data, val = batches(4, 1, torch.float32), batches(4, 2, torch.float32)
        train_marthe(a, lopt.frozen(a.parameters()), data, val)
        train_marthe(b, metaopt.make_optimizer(str(tmp_path / "ckpt"), b.parameters()), data, val)
    assert same(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# The registry contract (test_learned.py's first-order meta-gradient check, with the plain update), and arguments


def _plain_quadratic_unroll(lopt, steps=5, dim=6):
    """test_learned.py's contract: lopt.update(grads, state, params) with first-order gradients on ‖Wθ − y‖²."""
    gen = torch.Generator().manual_seed(0)
    W, y = torch.randn(dim, dim, generator=gen), torch.randn(dim, generator=gen)
    params = {"a": torch.randn(dim - 2, generator=gen), "b": torch.randn(2, generator=gen)}
    state = lopt.init(params)
    total = 0.0
    for _ in range(steps):
        leaves = {n: p.detach().requires_grad_() if not p.requires_grad else p for n, p in params.items()}
        loss = ((W @ torch.cat([leaves["a"], leaves["b"]]) - y) ** 2).sum()
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), retain_graph=True)))
        updates, state = lopt.update(grads, state, leaves)
        params = {n: leaves[n] + updates[n] for n in leaves}
        total = total + loss
    return total + ((W @ torch.cat([params["a"], params["b"]]) - y) ** 2).sum()


@pytest.mark.parametrize("name", ["cam-hd-learned-gamma", "marthe-learned-mu"])
def test_registered_and_plain_update_gives_every_theta_a_meta_gradient(name):
    cls = metaopt.learned.LEARNED_NAMES[name]
    assert cls in (LearnedGammaCAMHD, LearnedMuMARTHE) and cls.registry_name == name
    lopt = cls()  # default construction, as the registry-driven contract does
    assert_all_nonzero_finite(meta_grads(lopt, _plain_quadratic_unroll(lopt)))


@pytest.mark.parametrize("cls,kw,match", [
    (LearnedGammaCAMHD, dict(base="rmsprop"), "base"),
    (LearnedGammaCAMHD, dict(gamma=(0.5, 0.5)), "gamma"),
    (LearnedGammaCAMHD, dict(gamma=(0.0, 0.5, 0.5)), "gamma"),
    (LearnedGammaCAMHD, dict(lr=-1.0), "learning rate"),
    (LearnedGammaCAMHD, dict(momentum=0.9), "momentum"),
    (LearnedGammaCAMHD, dict(betas=(0.9, 1.0)), "beta parameter at index 1"),
    (LearnedGammaCAMHD, dict(beta_reduction="max"), "beta_reduction"),
    (LearnedGammaCAMHD, dict(hidden=0), "hidden"),
    (LearnedMuMARTHE, dict(base="rmsprop"), "base"),
    (LearnedMuMARTHE, dict(base="sgd", momentum=0.9), "momentum"),
    (LearnedMuMARTHE, dict(lr=-0.1), "learning rate"),
    (LearnedMuMARTHE, dict(adapt_hypergrad_lr=-1.0), "adapt_hypergrad_lr"),
])
def test_invalid_arguments_name_the_argument(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)


def test_h_mu_float_and_tensor_paths_agree_and_the_tensor_path_is_safe_at_zero():
    assert h_mu(0.25, 1.0) == 0.25 ** 0.5
    q = torch.tensor([0.0, 0.25, 1.0], dtype=F64, requires_grad=True)
    c = torch.tensor([2.0, 1.0, 0.0], dtype=F64, requires_grad=True)
    out = h_mu(q, c)
    torch.testing.assert_close(out.detach(), torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), [q, c]))


# ---------------------------------------------------------------------------------------------------------------------
# Presets: a short MetaTrainer run of each


@needs_fashion
@pytest.mark.parametrize("name", ["cam-hd-learned-gamma", "marthe-learned-mu"])
def test_three_meta_steps_of_the_preset_complete_and_change_theta(name, tmp_path):
    config = preset(name, horizon=4, truncation=2, meta_batch=2, batch_size=8, meta_steps=3, val_every=3,
                    val_tasks=1, checkpoint_every=10, seed=0)  # seed 0 draws CNN-1 and an MLP
    assert config.optimizer == name and config.family == "mlp-cnn"
    trainer = MetaTrainer(config, tmp_path)
    before = {k: v.clone() for k, v in trainer.lopt.state_dict().items()}
    metrics = trainer.run(progress=False)
    assert metrics["meta_step"] == 3 and metrics["skipped"] == 0
    assert math.isfinite(metrics["meta_loss"]) and math.isfinite(metrics["val_score"])
    after = trainer.lopt.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "last" / "model.safetensors").is_file()


def test_the_presets_meta_train_on_quadratics_and_resume_exactly(tmp_path):
    """Without the dataset too: the presets' optimizers run through the trainer (quadratic family, tiny), and their
    states (pytrees of int64 / float64 / float32 tensors) resume bit for bit from the training state file."""
    family = FixedFamily(quadratic(dtype=torch.float32))
    for name in ("cam-hd-learned-gamma", "marthe-learned-mu"):
        # fixed, small hyper-learning rates: the quadratics' hypergradients are large (see the unroll tests)
        kwargs = '{"hypergrad_lr": 1e-6}' if name == "cam-hd-learned-gamma" else \
            '{"hypergrad_lr": 1e-6, "adapt_hypergrad_lr": null}'
        config = preset(name, family="quadratic", horizon=4, truncation=2, meta_batch=2, meta_steps=2, val_every=0,
                        lr=0.002, optimizer_kwargs=kwargs)
        trainer = MetaTrainer(config, tmp_path / name, family=family)
        before = {k: v.clone() for k, v in trainer.lopt.state_dict().items()}
        assert trainer.run(progress=False)["skipped"] == 0
        assert any(not torch.equal(before[k], v) for k, v in trainer.lopt.state_dict().items())
        resumed = MetaTrainer(config, tmp_path / name, family=family, resume=True)
        for a, b in zip(trainer.slots, resumed.slots):
            assert type(a.opt_state) is type(b.opt_state) and tree_structure(a.opt_state) == tree_structure(b.opt_state)
            assert all(torch.equal(x, y) and x.dtype == y.dtype
                       for x, y in zip(tree_leaves(a.opt_state), tree_leaves(b.opt_state), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_frozen_rules_step_on_cuda():
    from metaopt.learned import LearnedGammaCAMHD, LearnedMuMARTHE

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).cuda()
    x, y = torch.randn(16, 5, device="cuda"), torch.randn(16, 3, device="cuda")
    for lopt in (LearnedGammaCAMHD(), LearnedMuMARTHE()):
        opt = lopt.frozen(model.named_parameters())
        for _ in range(3):
            def closure():
                return torch.nn.functional.mse_loss(model(x), y)

            if getattr(opt, "requires_closure", False):
                opt.step(closure)
            else:
                opt.zero_grad()
                closure().backward()
                opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("second_order", [False, True])
def test_recompute_keeps_the_rules_meta_gradient_with_oracles(second_order):
    """recompute=True checkpoints the update, which here also consumes the H·v and ∇E oracles (double backward)."""
    task = quadratic()
    lopts = {"gamma": gamma_rule(hypergrad_lr=1e-4),
             "mu": mu_rule(base="sgd", lr=0.005, hypergrad_lr=1e-5, adapt_hypergrad_lr=None)}
    for name, lopt in lopts.items():
        lopt.double()
        _perturb(lopt)
        kw = dict(lr=0.005, meta_loss="val" if name == "mu" else "mean", second_order=second_order)
        plain = unroll(lopt, [slot(lopt, task, 0), slot(lopt, task, 1)], 4, **kw)
        saved = unroll(lopt, [slot(lopt, task, 0), slot(lopt, task, 1)], 4, recompute=True, **kw)
        assert torch.equal(plain.meta_losses, saved.meta_losses), name
        ref, ours = meta_grads(lopt, plain.meta_losses.sum()), meta_grads(lopt, saved.meta_losses.sum())
        for key in ref:
            if ref[key] is None:
                assert ours[key] is None, (name, key)
            else:
                assert torch.allclose(ref[key], ours[key], rtol=1e-10, atol=1e-14), (name, key)
