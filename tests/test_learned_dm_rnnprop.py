"""DMoptimizer and RNNprop: their maths against hand computations and torch.nn.LSTM, and the learned-optimizer
contract (vmap, flattening, frozen face, exact resume, non-finite skip, meta-gradients, checkpoints)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.learned.base import LEARNED_NAMES, from_pretrained
from metaopt.learned.dm import DMOptimizer, log_sign_preprocess
from metaopt.learned.rnnprop import MOMENT_EPS, RNNprop

# name -> factory of a fresh optimizer; DM without preprocessing is a different input path, so it is tested too
FACTORIES = {
    "dm": lambda: DMOptimizer(),
    "dm-raw": lambda: DMOptimizer(preprocess=False),
    "rnnprop": lambda: RNNprop(),
}


def make(name: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    return FACTORIES[name]().to(dtype)


def random_params(gen: torch.Generator, shapes: dict[str, tuple[int, ...]], scale: float = 1.0):
    return {n: scale * torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}


def test_registered_names():
    assert LEARNED_NAMES["dm"] is DMOptimizer
    assert LEARNED_NAMES["rnnprop"] is RNNprop


# ----------------------------------------------------------------------------------------------------------------------
# DMoptimizer maths


def paper_preprocess(g: float, p: float = 10.0) -> tuple[float, float]:
    """App. A of Andrychowicz et al. 2016, written out in Python floats."""
    if abs(g) >= math.exp(-p):
        return math.log(abs(g)) / p, math.copysign(1.0, g)
    return -1.0, math.exp(p) * g


def test_dm_preprocessing_matches_the_paper():
    threshold = math.exp(-10.0)
    values = [0.0, 1e-12, -1e-7, 4e-5, -4.5e-5, threshold, -threshold, 4.6e-5, 0.3, -1.0, 2.5, -1e4]
    got = log_sign_preprocess(torch.tensor(values, dtype=torch.float64), p=10.0)
    expected = torch.tensor([paper_preprocess(g) for g in values], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0.0)
    # a different p moves the threshold and the scales
    got5 = log_sign_preprocess(torch.tensor([1e-3, -1e-2], dtype=torch.float64), p=5.0)
    expected5 = torch.tensor([paper_preprocess(1e-3, 5.0), paper_preprocess(-1e-2, 5.0)], dtype=torch.float64)
    torch.testing.assert_close(got5, expected5, rtol=1e-15, atol=0.0)


def test_dm_preprocessing_is_finite_with_finite_gradients_at_zero():
    g = torch.tensor([0.0, -0.0, 1e-30, 2.0], dtype=torch.float64, requires_grad=True)
    out = log_sign_preprocess(g)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), g)
    assert torch.isfinite(grad).all()
    # below the threshold only the second feature e^p g depends on g; above it only log|g|/p does
    torch.testing.assert_close(grad, torch.tensor([math.exp(10.0)] * 3 + [1 / (2.0 * 10.0)], dtype=torch.float64))

    # and through the whole optimizer: an all-zero gradient gives finite updates and finite meta-gradients
    lopt = make("dm")
    zero = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    state = lopt.init_flat(4, zero)
    direction, state = lopt.step_flat(zero, state)
    direction, state = lopt.step_flat(zero, state)
    grads = torch.autograd.grad(direction.sum(), [zero, *lopt.parameters()])
    assert torch.isfinite(direction).all()
    assert all(torch.isfinite(gr).all() for gr in grads)


def copy_into_nn_lstm(cells: nn.ModuleList) -> nn.LSTM:
    """An nn.LSTM with the weights of our stacked cells (our single bias as bias_ih, bias_hh = 0)."""
    lstm = nn.LSTM(cells[0].input_size, cells[0].hidden_size, num_layers=len(cells)).double()
    with torch.no_grad():
        for layer, cell in enumerate(cells):
            getattr(lstm, f"weight_ih_l{layer}").copy_(cell.weight_ih)
            getattr(lstm, f"weight_hh_l{layer}").copy_(cell.weight_hh)
            getattr(lstm, f"bias_ih_l{layer}").copy_(cell.bias)
            getattr(lstm, f"bias_hh_l{layer}").zero_()
    return lstm


def gradient_sequence(steps: int = 4, n: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    seq = [torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-7, 2, (n,), generator=gen)
           for _ in range(steps)]
    seq[1][0] = 0.0  # an exact zero on the way
    return seq


@pytest.mark.parametrize("name", ["dm", "dm-raw", "rnnprop"])
def test_lstm_recurrence_equals_torch_lstm(name):
    lopt = make(name)
    reference = copy_into_nn_lstm(lopt.lstm)
    seq = gradient_sequence()
    n, layers, hidden = seq[0].numel(), lopt.num_layers, lopt.hidden_size
    state = lopt.init_flat(n, seq[0])
    hx = (torch.zeros(layers, n, hidden, dtype=torch.float64), torch.zeros(layers, n, hidden, dtype=torch.float64))
    with torch.no_grad():
        for grad in seq:
            if isinstance(lopt, RNNprop):
                features, _ = lopt.moments(grad, state)
                lstm_input = F.elu(lopt.input(features))
            else:
                lstm_input = lopt.inputs(grad)
            direction, state = lopt.step_flat(grad, state)
            top, hx = reference(lstm_input.unsqueeze(0), hx)  # a length-1 sequence of n coordinates
            torch.testing.assert_close(state.h, torch.cat(list(hx[0]), dim=-1), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(state.c, torch.cat(list(hx[1]), dim=-1), rtol=1e-12, atol=1e-14)
            out = lopt.output(top[0]).squeeze(-1)
            expected = 0.1 * torch.tanh(out) if isinstance(lopt, RNNprop) else 0.1 * out
            torch.testing.assert_close(direction, expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------------------------------
# RNNprop maths


def test_rnnprop_moment_inputs_match_hand_computation():
    lopt = make("rnnprop")
    beta = 0.95
    seq = gradient_sequence(steps=3)
    state = lopt.init_flat(seq[0].numel(), seq[0])
    for t in range(1, 4):
        features, _ = lopt.moments(seq[t - 1], state)
        _, state = lopt.step_flat(seq[t - 1], state)
        # closed forms: m_t = (1 − β) Σ_s β^{t−s} g_s, bias-corrected by 1 − β^t; same for v with g²
        m = sum((1 - beta) * beta ** (t - s) * seq[s - 1] for s in range(1, t + 1))
        v = sum((1 - beta) * beta ** (t - s) * seq[s - 1] ** 2 for s in range(1, t + 1))
        m_hat, v_hat = m / (1 - beta ** t), v / (1 - beta ** t)
        root = torch.sqrt(v_hat + MOMENT_EPS)
        expected = torch.stack([seq[t - 1] / root, m_hat / root], dim=-1)
        torch.testing.assert_close(features, expected, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(state.b1_hat.squeeze(-1), torch.full_like(m, 1 - beta ** t), rtol=1e-14, atol=0)
    # the first step sees (sgn g, sgn g) wherever g² ≫ ε, whatever the gradient's scale
    g = torch.tensor([3e-6, -1e-3, 0.5, -7.0, 1e4], dtype=torch.float64)
    first, _ = lopt.moments(g, lopt.init_flat(g.numel(), g))
    torch.testing.assert_close(first, torch.sign(g).unsqueeze(-1).expand(-1, 2), rtol=1e-5, atol=0.0)


def test_rnnprop_update_is_bounded_by_lr_times_output_bound():
    lopt = make("rnnprop")
    with torch.no_grad():  # saturate tanh so that the bound is reached, not just respected
        lopt.output.weight.mul_(100.0)
        lopt.output.bias.mul_(100.0)
    gen = torch.Generator().manual_seed(2)
    params = random_params(gen, {"w": (50,), "b": (3, 4)})
    state = lopt.init(params)
    lr = 0.3
    largest = 0.0
    for _ in range(5):
        grads = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) * 1e3 for n, p in params.items()}
        updates, state = lopt.update(grads, state, params, lr=lr)
        for u in updates.values():
            assert (u.abs() <= lr * 0.1).all()
            largest = max(largest, float(u.detach().abs().max()))
    assert largest > 0.99 * lr * 0.1


# ----------------------------------------------------------------------------------------------------------------------
# The contract, for both optimizers


@pytest.mark.parametrize("name", list(FACTORIES))
def test_lr_is_a_multiplicative_step_size(name):
    lopt = make(name)
    gen = torch.Generator().manual_seed(3)
    params = random_params(gen, {"w": (3, 2)})
    grads = random_params(gen, {"w": (3, 2)})
    state = lopt.init(params)
    unit, state_unit = lopt.update(grads, state, params)
    half, state_half = lopt.update(grads, state, params, lr=0.5)
    torch.testing.assert_close(half["w"], 0.5 * unit["w"], rtol=1e-15, atol=0.0)
    for a, b in zip(state_unit, state_half):
        assert torch.equal(a["w"], b["w"])


@pytest.mark.parametrize("name", list(FACTORIES))
def test_vmap_over_learner_instances_equals_a_loop(name):
    lopt = make(name)
    gen = torch.Generator().manual_seed(4)
    shapes = {"w": (3, 4, 2), "b": (3, 5)}  # a leading batch of 3 learner instances
    params = random_params(gen, shapes)
    grad_seq = [random_params(gen, shapes) for _ in range(3)]

    batched_update = torch.func.vmap(lambda g, s, p: lopt.update(g, s, p))
    state = torch.func.vmap(lopt.init)(params)
    batched = []
    for grads in grad_seq:
        updates, state = batched_update(grads, state, params)
        batched.append(updates)

    for i in range(3):
        params_i = {n: p[i] for n, p in params.items()}
        state_i = lopt.init(params_i)
        for step, grads in enumerate(grad_seq):
            updates_i, state_i = lopt.update({n: g[i] for n, g in grads.items()}, state_i, params_i)
            for n in shapes:
                torch.testing.assert_close(batched[step][n][i], updates_i[n], rtol=1e-12, atol=1e-15)
        for field_batched, field_i in zip(state, state_i):
            for n in shapes:
                torch.testing.assert_close(field_batched[n][i], field_i[n], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_dict_of_tensors_equals_flat_concatenation(name):
    lopt = make(name)
    gen = torch.Generator().manual_seed(5)
    shapes = {"a": (3, 2), "b": (4,)}
    params = random_params(gen, shapes)
    flat_params = {"ab": torch.cat([params["a"].flatten(), params["b"]])}
    state, flat_state = lopt.init(params), lopt.init(flat_params)
    for _ in range(3):
        grads = random_params(gen, shapes)
        updates, state = lopt.update(grads, state, params)
        flat_updates, flat_state = lopt.update({"ab": torch.cat([grads["a"].flatten(), grads["b"]])}, flat_state,
                                               flat_params)
        assert updates["a"].shape == (3, 2) and updates["b"].shape == (4,)
        assert torch.equal(torch.cat([updates["a"].flatten(), updates["b"]]), flat_updates["ab"])
        for field, flat_field in zip(state, flat_state):
            assert field["a"].shape[:2] == (3, 2)
            assert torch.equal(torch.cat([field["a"].flatten(0, 1), field["b"]]), flat_field["ab"])


def make_regression(seed: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(3, 2).double()
    return model, x, y


def train(model: nn.Module, opt: torch.optim.Optimizer, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_frozen_face_builds_no_graph(name):
    lopt = make(name)
    assert all(p.requires_grad for p in lopt.parameters())
    model, x, y = make_regression()
    before = [p.detach().clone() for p in model.parameters()]
    opt = lopt.frozen(model.parameters())
    train(model, opt, x, y, steps=3)
    for p, p0 in zip(model.parameters(), before):
        assert p.grad_fn is None
        assert not torch.equal(p, p0)
    stored = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert stored and not any(t.requires_grad or t.grad_fn is not None for t in stored)
    # per-parameter state: the parameter's shape plus the state width
    weight_state = opt.state[model.weight]
    assert weight_state["h"].shape == (2, 3, lopt.num_layers * lopt.hidden_size)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_resume_is_bit_exact(name):
    lopt = make(name)
    straight, x, y = make_regression()
    train(straight, lopt.frozen(straight.parameters()), x, y, steps=10)

    first, _, _ = make_regression()
    opt = lopt.frozen(first.parameters())
    train(first, opt, x, y, steps=5)
    model_sd, opt_sd = copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict())

    resumed, _, _ = make_regression(seed=7)  # different initial weights, overwritten by the load
    resumed.load_state_dict(model_sd)
    opt = lopt.frozen(resumed.parameters())
    opt.load_state_dict(opt_sd)
    train(resumed, opt, x, y, steps=5)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_nonfinite_gradients_are_skipped(name):
    lopt = make(name)
    model, x, y = make_regression()
    opt = lopt.frozen(model.parameters())
    train(model, opt, x, y, steps=2)
    params_before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    model.weight.grad[0, 1] = float("nan")
    model.bias.grad[1] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert opt.param_groups[0]["nonfinite_skipped"] == 1
    for p, p0 in zip(model.parameters(), params_before):
        assert torch.equal(p, p0)
    state_after = opt.state_dict()["state"]
    for index, fields in state_before.items():
        for field, value in fields.items():
            assert torch.equal(state_after[index][field], value)


def quadratic_meta_loss(lopt, steps: int = 5) -> torch.Tensor:
    """Sum of the losses ‖W w − y‖² along a ``steps``-step unroll, differentiable w.r.t. the optimizer's θ."""
    gen = torch.Generator().manual_seed(8)
    W = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(6, generator=gen, dtype=torch.float64)
    params = {"w": torch.randn(3, generator=gen, dtype=torch.float64),
              "v": torch.randn(2, generator=gen, dtype=torch.float64)}

    def loss(p):
        return ((W @ torch.cat([p["w"], p["v"]]) - y) ** 2).sum()

    params = {n: p.requires_grad_(True) for n, p in params.items()}
    state = lopt.init(params)
    total = loss(params)
    for _ in range(steps):
        grads = dict(zip(params, torch.autograd.grad(loss(params), list(params.values()), create_graph=True)))
        updates, state = lopt.update(grads, state, params)
        params = {n: p + updates[n] for n, p in params.items()}
        total = total + loss(params)
    return total


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_theta_gets_a_finite_nonzero_meta_gradient(name):
    lopt = make(name)
    theta = dict(lopt.named_parameters())
    meta_grads = dict(zip(theta, torch.autograd.grad(quadratic_meta_loss(lopt), list(theta.values()))))
    for key, grad in meta_grads.items():
        assert torch.isfinite(grad).all(), key
        assert (grad != 0).all(), key

    # the meta-gradient is the derivative: a central difference along a random direction of θ agrees
    gen = torch.Generator().manual_seed(9)
    direction = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in theta.items()}
    eps = 1e-6

    def shifted(sign: float):
        other = copy.deepcopy(lopt)
        with torch.no_grad():
            for key, p in other.named_parameters():
                p.add_(sign * eps * direction[key])
        return quadratic_meta_loss(other).detach()

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    analytic = sum((meta_grads[k] * direction[k]).sum() for k in theta)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_save_and_load_pretrained_round_trip(name, tmp_path):
    lopt = make(name, dtype=torch.float32)
    lopt.save_pretrained(tmp_path / name)
    loaded = from_pretrained(tmp_path / name)
    assert type(loaded) is type(lopt) and loaded.config == lopt.config
    assert not any(p.requires_grad for p in loaded.parameters())
    gen = torch.Generator().manual_seed(10)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    state, loaded_state = lopt.init(params), loaded.init(params)
    with torch.no_grad():
        for _ in range(3):
            grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
            updates, state = lopt.update(grads, state, params)
            loaded_updates, loaded_state = loaded.update(grads, loaded_state, params)
            for n in params:
                assert torch.equal(updates[n], loaded_updates[n])


@pytest.mark.parametrize("cls, kwargs, message", [
    (DMOptimizer, dict(hidden_size=0), "Invalid hidden_size"),
    (DMOptimizer, dict(lr=-1.0), "Invalid learning rate"),
    (DMOptimizer, dict(output_scale=0.0), "Invalid output_scale"),
    (DMOptimizer, dict(p=-1.0), "Invalid p"),
    (RNNprop, dict(num_layers=0), "Invalid num_layers"),
    (RNNprop, dict(betas=(1.0, 0.95)), "Invalid beta parameter at index 0"),
    (RNNprop, dict(output_bound=-0.1), "Invalid output_bound"),
])
def test_invalid_arguments_are_rejected(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
