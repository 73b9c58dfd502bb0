"""Learned optimizers: the contract over the registry, HyperAdam's maths, the frozen face, and checkpoint safety."""

import contextlib
import copy
import json
import pickle

import pytest
import torch
from helpers import assert_nonfinite_step_is_skipped
from torch.func import functional_call, vmap

import metaopt
from metaopt import learned
from metaopt.learned import CheckpointError, HyperAdam, from_pretrained
from metaopt.learned.cells import flatten, safe_sqrt

# registry name -> a small fresh instance for the contract tests (the learned-rule classes add their own)
FRESH = {
    "hyperadam": lambda: HyperAdam(num_candidates=4),
}


def fresh(name):
    return FRESH[name]() if name in FRESH else learned.LEARNED_NAMES[name]()


COORDINATEWISE = [n for n, cls in learned.LEARNED_NAMES.items() if issubclass(cls, learned.CoordinatewiseOptimizer)]


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def train(model, opt, steps, seed=1, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)
        opt.zero_grad()
        loss = scale * torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()) / scale)
    return losses


def quadratic_unroll(lopt, steps=5, seed=0, dim=6, second_order=False):
    """Sum of losses of a small quadratic ‖Wθ − y‖² over an unroll of ``lopt`` (differentiable w.r.t. θ_opt).
    First order by default (inner gradients are constants, as in learning-to-learn); ``second_order`` keeps
    their dependence on θ_opt, which is the exact derivative that finite differences see."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(lopt.parameters()).dtype
    W, y = torch.randn(dim, dim, generator=gen, dtype=dtype), torch.randn(dim, generator=gen, dtype=dtype)
    params = {"a": torch.randn(dim - 2, generator=gen, dtype=dtype), "b": torch.randn(2, generator=gen, dtype=dtype)}
    state = lopt.init(params)
    total = 0.0
    for _ in range(steps):
        leaves = {n: p.detach().requires_grad_() if not p.requires_grad else p for n, p in params.items()}
        theta = torch.cat([leaves["a"], leaves["b"]])
        loss = ((W @ theta - y) ** 2).sum()
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), retain_graph=True,
                                                     create_graph=second_order)))
        updates, state = lopt.update(grads, state, leaves)
        params = {n: leaves[n] + updates[n] for n in leaves}
        total = total + loss
    theta = torch.cat([params["a"], params["b"]])
    return total + ((W @ theta - y) ** 2).sum()


# ---------------------------------------------------------------------------------------------------------------------
# The contract, over every registered learned optimizer


@pytest.mark.parametrize("name", list(learned.LEARNED_NAMES))
def test_every_meta_parameter_receives_a_finite_meta_gradient(name):
    lopt = fresh(name)
    loss = quadratic_unroll(lopt)
    grads = torch.autograd.grad(loss, list(lopt.parameters()), allow_unused=True)
    for (pname, _), g in zip(lopt.named_parameters(), grads):
        assert g is not None, f"{pname} gets no meta-gradient"
        assert torch.isfinite(g).all(), f"{pname}: non-finite meta-gradient"
        assert g.abs().sum() > 0, f"{pname}: zero meta-gradient"


@pytest.mark.parametrize("name", COORDINATEWISE)
def test_state_shapes_are_stable_and_updates_finite(name):
    lopt = fresh(name)
    model = small_model()
    opt = lopt.frozen(model.parameters(), lr=0.01)
    train(model, opt, 1)
    shapes = {k: {f: v.shape for f, v in st.items()} for k, st in opt.state_dict()["state"].items()}
    train(model, opt, 4)
    assert shapes == {k: {f: v.shape for f, v in st.items()} for k, st in opt.state_dict()["state"].items()}
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", COORDINATEWISE)
def test_frozen_face_builds_no_graph(name):
    model = small_model()
    opt = fresh(name).frozen(model.parameters(), lr=0.01)
    train(model, opt, 3)
    assert all(p.grad_fn is None for p in model.parameters())
    for st in opt.state.values():
        assert all(not v.requires_grad and v.grad_fn is None for v in st.values() if torch.is_tensor(v))
    assert not any(p.requires_grad for p in opt.lopt.parameters())


@pytest.mark.parametrize("name", COORDINATEWISE)
def test_state_dict_resume_is_bit_exact(name):
    lopt = fresh(name)
    straight = small_model()
    opt = lopt.frozen(straight.parameters(), lr=0.01)
    train(straight, opt, 5, seed=1)
    train(straight, opt, 5, seed=2)
    resumed = small_model()
    opt1 = lopt.frozen(resumed.parameters(), lr=0.01)
    train(resumed, opt1, 5, seed=1)
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = lopt.frozen(resumed.parameters(), lr=0.01)
    opt2.load_state_dict(saved)
    train(resumed, opt2, 5, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.parametrize("name", COORDINATEWISE)
def test_save_load_round_trip_gives_identical_updates(name, tmp_path):
    lopt = fresh(name)
    lopt.save_pretrained(tmp_path / "ckpt", card="# test card\n")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(lopt) and loaded.config == lopt.config
    a, b = small_model(), small_model()
    train(a, lopt.frozen(a.parameters()), 4)
    train(b, metaopt.make_optimizer(str(tmp_path / "ckpt"), b.parameters()), 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert (tmp_path / "ckpt" / "README.md").read_text() == "# test card\n"


@pytest.mark.parametrize("name", COORDINATEWISE)
def test_nonfinite_gradient_never_reaches_params_or_state(name):
    model = small_model()
    opt = fresh(name).frozen(model.parameters(), lr=0.01)
    train(model, opt, 2)
    assert_nonfinite_step_is_skipped(model, opt, fill=0.0)


@pytest.mark.parametrize("name", COORDINATEWISE)
def test_update_under_vmap_equals_a_loop_and_dict_equals_flat(name):
    lopt = fresh(name)
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 4, 2, generator=gen), "b": torch.randn(3, 5, generator=gen)}
    grads = {"w": torch.randn(3, 4, 2, generator=gen), "b": torch.randn(3, 5, generator=gen)}

    def two_steps(p, g):
        state = lopt.init(p)
        u1, state = lopt.update(g, state, p)
        u2, state = lopt.update({n: 0.5 * v + 0.1 for n, v in g.items()}, state, p)
        return u2

    batched = vmap(two_steps)(params, grads)
    for i in range(3):
        single = two_steps({n: v[i] for n, v in params.items()}, {n: v[i] for n, v in grads.items()})
        for n in params:
            assert torch.allclose(batched[n][i], single[n], rtol=1e-5, atol=1e-7)
    # the same coordinates as one flat tensor give the same update
    p0 = {n: v[0] for n, v in params.items()}
    g0 = {n: v[0] for n, v in grads.items()}
    flat = two_steps({"all": flatten(p0, ["w", "b"])}, {"all": flatten(g0, ["w", "b"])})["all"]
    assert torch.allclose(flat, flatten(two_steps(p0, g0), ["w", "b"]), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", list(learned.LEARNED_NAMES))
def test_step_is_the_protocol_of_every_rule(name):
    """``step(params, grads, state)`` (the protocol the hand-designed rules share) gives the parameters plus
    ``update``'s updates, bit for bit, and the same state; what a step needs beyond gradients is declared."""
    lopt = fresh(name)
    gen = torch.Generator().manual_seed(3)
    params = {"layer.weight": torch.randn(4, 3, generator=gen), "layer.bias": torch.randn(4, generator=gen)}
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    extra = {}
    if lopt.needs_oracles:
        extra = {"hvp": {n: 0.1 * g for n, g in grads.items()}, "val_grads": {n: -g for n, g in grads.items()}}
    if lopt.static_step(lopt.init(params)) is not None:
        extra["step"] = lopt.static_step(lopt.init(params))
    new_params, state = lopt.step(params, grads, lopt.init(params), lr=0.01, **extra)
    updates, expected = lopt.update(grads, lopt.init(params), params, lr=0.01, **extra)
    assert set(new_params) == set(params)
    for n, p in params.items():
        assert torch.equal(new_params[n], p + updates[n])
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(expected)):
        assert torch.equal(a, b)
    assert isinstance(type(lopt).needs_oracles, bool)


def test_what_a_plain_learned_step_needs_is_declared_on_the_base():
    lopt = HyperAdam(num_candidates=2)
    assert lopt.needs_oracles is False and lopt.static_step(lopt.init({"w": torch.zeros(3)})) is None
    with pytest.raises(TypeError, match="no oracles"):
        lopt.hvp_vectors(lopt.init({"w": torch.zeros(3)}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", COORDINATEWISE)
def test_frozen_face_on_cuda_matches_cpu(name):
    lopt = fresh(name)
    cpu, gpu = small_model(), small_model().cuda()
    train(cpu, copy.deepcopy(lopt).frozen(cpu.parameters(), lr=0.01), 3)
    opt = copy.deepcopy(lopt).frozen(gpu.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 5, generator=gen).cuda(), torch.randn(16, 3, generator=gen).cuda()
        opt.zero_grad()
        torch.nn.functional.mse_loss(gpu(x), y).backward()
        opt.step()
    assert all(torch.allclose(p, q.cpu(), atol=1e-5) for p, q in zip(cpu.parameters(), gpu.parameters()))


# ---------------------------------------------------------------------------------------------------------------------
# HyperAdam's maths


def test_hyperadam_with_one_candidate_and_adam_init_is_adam():
    """HyperAdam(J=1, init="adam", betas=(0.9, 0.999)) equals torch.optim.Adam(eps=0) step for step."""
    with default_dtype(torch.float64):
        lopt = HyperAdam(num_candidates=1, init="adam", betas=(0.9, 0.999))
    ours, ref = small_model(torch.float64), small_model(torch.float64)
    opt = lopt.frozen(ours.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01, eps=0.0, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        x, y = torch.randn(16, 5, generator=gen).double(), torch.randn(16, 3, generator=gen).double()
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


def test_hyperadam_bias_accumulators_follow_lemma_1():
    """With constant decay rates (init="adam"), β̂_t = 1 − β^t and γ̂_t = 1 − γ^t for every candidate."""
    with default_dtype(torch.float64):
        lopt = HyperAdam(num_candidates=5, init="adam")
    beta = torch.sigmoid(lopt.decay_beta.bias.detach())
    gamma = torch.sigmoid(lopt.decay_gamma.bias.detach())
    params = {"w": torch.randn(7, dtype=torch.float64)}
    state = lopt.init(params)
    for t in range(1, 13):
        _, state = lopt.update({"w": torch.randn(7, dtype=torch.float64)}, state, params)
        assert torch.allclose(state.beta_hat["w"], (1 - beta**t).expand(7, 5), rtol=1e-13)
        assert torch.allclose(state.gamma_hat["w"], (1 - gamma**t).expand(7, 5), rtol=1e-13)
    assert (beta[1:] < beta[:-1]).all()  # the candidates' decay rates are spread


def test_hyperadam_is_invariant_to_the_scale_of_the_loss():
    with default_dtype(torch.float64):
        lopt = HyperAdam(num_candidates=4, init="random")
    a, b = small_model(torch.float64), small_model(torch.float64)
    losses_a = train(a, lopt.frozen(a.parameters(), lr=0.01), 25)
    losses_b = train(b, lopt.frozen(b.parameters(), lr=0.01), 25, scale=1000.0)
    assert losses_a == pytest.approx(losses_b, rel=1e-9)
    assert all(torch.allclose(p, q, rtol=1e-9, atol=1e-12) for p, q in zip(a.parameters(), b.parameters()))


def test_hyperadam_ablations_build_and_step():
    for kw in (dict(use_lstm=False), dict(preprocess=False), dict(use_lstm=False, preprocess=False)):
        lopt = HyperAdam(num_candidates=3, **kw)
        model = small_model()
        losses = train(model, lopt.frozen(model.parameters(), lr=0.01), 5)
        assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert HyperAdam(num_candidates=3, use_lstm=False).lstm is None


def test_hyperadam_invalid_arguments():
    with pytest.raises(ValueError, match="num_candidates"):
        HyperAdam(num_candidates=0)
    with pytest.raises(ValueError, match="init"):
        HyperAdam(init="zeros")
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        HyperAdam(betas=(0.9, 1.0))


def test_safe_sqrt_has_a_finite_zero_derivative_at_zero():
    x = torch.tensor([0.0, 4.0], requires_grad=True)
    y = safe_sqrt(x, 1e-24)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.tensor([0.0, 0.25]))
    assert torch.allclose(y, torch.tensor([1e-12, 2.0]))


def test_hyperadam_meta_gradient_matches_finite_differences():
    with default_dtype(torch.float64):
        lopt = HyperAdam(num_candidates=2)
    (param_name, theta) = next((n, p) for n, p in lopt.named_parameters() if n == "decay_beta.bias")
    loss = quadratic_unroll(lopt, steps=4, dim=4, second_order=True)
    (grad,) = torch.autograd.grad(loss, theta)
    eps = 1e-6
    for i in range(theta.numel()):
        with torch.no_grad():
            theta[i] += eps
        up = float(quadratic_unroll(lopt, steps=4, dim=4).detach())
        with torch.no_grad():
            theta[i] -= 2 * eps
        down = float(quadratic_unroll(lopt, steps=4, dim=4).detach())
        with torch.no_grad():
            theta[i] += eps
        assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8), param_name


# ---------------------------------------------------------------------------------------------------------------------
# make_optimizer, schedulers, checkpoints


def test_make_optimizer_accepts_an_instance_a_directory_and_a_registered_name(tmp_path, monkeypatch):
    lopt = HyperAdam(num_candidates=3)
    model = small_model()
    assert isinstance(metaopt.make_optimizer(lopt, model.parameters()), learned.FrozenLearnedOptimizer)
    monkeypatch.setenv("METAOPT_CHECKPOINTS", str(tmp_path))
    with pytest.raises(CheckpointError, match="No pretrained checkpoint for 'hyperadam'"):
        metaopt.make_optimizer("hyperadam", model.parameters())
    lopt.save_pretrained(tmp_path / "hyperadam")
    opt = metaopt.make_optimizer("hyperadam", model.parameters())
    assert opt.param_groups[0]["lr"] == lopt.lr == 0.005
    opt = metaopt.make_optimizer(tmp_path / "hyperadam", model.parameters(), lr=0.01)
    assert opt.param_groups[0]["lr"] == 0.01


def test_lr_scheduler_sets_the_step_size():
    lopt = HyperAdam(num_candidates=3)
    a, b = small_model(), small_model()
    opt_a = lopt.frozen(a.parameters(), lr=0.01)
    opt_b = lopt.frozen(b.parameters(), lr=0.02)
    torch.optim.lr_scheduler.LambdaLR(opt_b, lambda epoch: 0.5)
    train(a, opt_a, 4)
    train(b, opt_b, 4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class _Exploit:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (exec, (f"open({self.flag!r}, 'w').write('pwned')",))


def test_pickles_are_refused_and_never_run(tmp_path):
    flag = tmp_path / "flag"
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps(_Exploit(str(flag))))
    with pytest.raises(CheckpointError, match="pickle"):
        from_pretrained(evil)
    bin_dir = tmp_path / "bin_only"
    bin_dir.mkdir()
    (bin_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(str(flag))))
    with pytest.raises(CheckpointError, match="pickle files are refused"):
        from_pretrained(bin_dir)
    with pytest.raises(CheckpointError, match="pickle"):
        metaopt.make_optimizer(evil, [torch.zeros(1, requires_grad=True)])
    assert not flag.exists()


def test_corrupt_and_mismatched_checkpoints_name_the_problem(tmp_path):
    ckpt = HyperAdam(num_candidates=3).save_pretrained(tmp_path / "ok")
    weights = ckpt / "model.safetensors"

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((ckpt / "config.json").read_text())
    (truncated / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated.*model\.safetensors|model\.safetensors.*truncated"):
        from_pretrained(truncated)

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(weights.read_bytes())
        config = json.loads((ckpt / "config.json").read_text())
        edit(config)
        (d / "config.json").write_text(json.dumps(config))
        return d

    wrong_shape = variant("shape", lambda c: c["config"].update(num_candidates=5))
    with pytest.raises(CheckpointError, match="shape"):
        from_pretrained(wrong_shape)
    no_lstm = variant("keys", lambda c: c["config"].update(use_lstm=False))
    with pytest.raises(CheckpointError, match="unexpected"):
        from_pretrained(no_lstm)
    with pytest.raises(CheckpointError, match="unknown class 'Nope'"):
        from_pretrained(variant("cls", lambda c: c.update({"class": "Nope"})))
    with pytest.raises(CheckpointError, match="format_version 99"):
        from_pretrained(variant("version", lambda c: c.update(format_version=99)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        from_pretrained(tmp_path / "empty")


def test_functional_call_of_a_learner_with_the_frozen_update():
    """The frozen face and the functional update agree (one implementation)."""
    lopt = HyperAdam(num_candidates=3)
    model = small_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(8, 5), torch.randn(8, 3)

    def loss_fn(p):
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    state = lopt.init(params)
    grads = torch.func.grad(loss_fn)(params)
    updates, _ = lopt.update(grads, state, params, lr=0.01)
    opt = lopt.frozen(model.parameters(), lr=0.01)
    opt.zero_grad()
    loss_fn({n: p for n, p in model.named_parameters()}).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p, params[n] + updates[n], rtol=0, atol=1e-7)


def test_frozen_face_param_groups_each_run_the_cell_with_their_own_lr():
    lopt = HyperAdam(num_candidates=3)
    model = small_model()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = lopt.frozen([{"params": first, "lr": 0.01}, {"params": second}], lr=0.002)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    opt.step()
    for group, lr in ((first, 0.01), (second, 0.002)):  # each group is its own call of the cell (own normalization)
        params = {str(i): before[id(p)] for i, p in enumerate(group)}
        updates, _ = lopt.update({str(i): grads[id(p)] for i, p in enumerate(group)}, lopt.init(params), params, lr=lr)
        for i, p in enumerate(group):
            assert torch.allclose(p.detach(), params[str(i)] + updates[str(i)], atol=1e-7)
