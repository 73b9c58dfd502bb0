"""The fused meta-training cells (metaopt.learned.fused) against the reference cells they replace.

The reference is autograd through ``HyperAdam.step_flat`` (and the vmapped unroll through ``update``); the fused cell
has a hand-written backward. Compared in float64 (forward, every input's and θ's gradient, float64 gradcheck against
finite differences), under vmap, through the whole unroll (meta-losses and meta-gradients, first and second order),
and compiled (float32 rounding).
"""

from __future__ import annotations

import pytest
import torch

import meta_tasks
from metaopt import compiling
from meta_tasks.tricks import hyperadam_tricks
from metaopt.learned import HyperAdam
from metaopt.learned import fused
from metaopt.learned.fused import HyperAdamCell, hyperadam_step, hyperadam_theta
from metaopt.meta.unroll import Slot, unroll

EPS = 1e-24


def _random_state(lopt: HyperAdam, lead: tuple[int, ...], n: int, generator: torch.Generator,
                  dtype=torch.float64) -> list[torch.Tensor]:
    """A state a few steps into a run: LSTM fields of either sign, positive moments / accumulators in (0, 1]."""
    J = lopt.num_candidates
    s = torch.randn(*lead, n, J, generator=generator, dtype=dtype) * 0.5
    c = torch.randn(*lead, n, J, generator=generator, dtype=dtype)
    m = torch.randn(*lead, n, J, generator=generator, dtype=dtype) * 0.1
    v = torch.rand(*lead, n, J, generator=generator, dtype=dtype) * 0.01
    bh = torch.rand(*lead, n, J, generator=generator, dtype=dtype) * 0.9 + 0.1
    gh = torch.rand(*lead, n, J, generator=generator, dtype=dtype) * 0.9 + 0.1
    return [s, c, m, v, bh, gh]


def _reference(lopt: HyperAdam, grad: torch.Tensor, state: list[torch.Tensor]):
    """step_flat per instance of the leading dimension, stacked."""
    state_type = type(lopt.init_flat(1, grad))
    outs = [lopt.step_flat(grad[b], state_type(*(f[b] for f in state))) for b in range(grad.shape[0])]
    return torch.stack([o[0] for o in outs]), [torch.stack([o[1][i] for o in outs]) for i in range(6)]


@pytest.mark.parametrize("J,n,lead,normalize", [(3, 11, 2, False), (5, 40, 1, True), (20, 64, 3, False),
                                               (20, 64, 2, True)])
def test_fused_hyperadam_equals_the_reference_and_its_gradients(J, n, lead, normalize):
    gen = torch.Generator().manual_seed(J * 100 + n)
    torch.manual_seed(J)
    lopt = HyperAdam(num_candidates=J, normalize_state=normalize).double()
    grad = torch.randn(lead, n, generator=gen, dtype=torch.float64)
    grad[0, : n // 4] = 0.0  # coordinates without a gradient: the safe square roots' zero derivatives
    grad.requires_grad_()
    state = [f.requires_grad_() for f in _random_state(lopt, (lead,), n, gen)]
    state[3].data[0, :2] = 0.0  # v = 0 somewhere: u = 0 inside the moment field's root
    d_ref, s_ref = _reference(lopt, grad, state)
    d_fused, s_fused = lopt.fused_step(grad, state)
    torch.testing.assert_close(d_fused, d_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(s_fused, s_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (d_ref, *s_ref)]
    inputs = [grad, *state, *lopt.parameters()]

    def vjp(outputs):
        total = sum((o * w).sum() for o, w in zip(outputs, cotangents))
        return torch.autograd.grad(total, inputs)

    for a, b in zip(vjp([d_fused, *s_fused]), vjp([d_ref, *s_ref])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("normalize", [False, True])
def test_fused_hyperadam_passes_gradcheck(normalize):
    gen = torch.Generator().manual_seed(1)
    lopt = HyperAdam(num_candidates=3, normalize_state=normalize).double()
    grad = torch.randn(2, 6, generator=gen, dtype=torch.float64).requires_grad_()
    state = [f.requires_grad_() for f in _random_state(lopt, (2,), 6, gen)]
    theta = [t.detach().clone().requires_grad_() for t in hyperadam_theta(lopt)]
    assert torch.autograd.gradcheck(lambda g, *t: HyperAdamCell.apply(EPS, False, normalize, g, *t), (grad, *state, *theta))


def test_fused_hyperadam_gradient_of_only_some_outputs():
    """Unused outputs get no cotangent (None, not materialized zeros); the rest of the backward is unchanged."""
    gen = torch.Generator().manual_seed(2)
    lopt = HyperAdam(num_candidates=4).double()
    grad = torch.randn(1, 9, generator=gen, dtype=torch.float64)
    state = _random_state(lopt, (1,), 9, gen)
    d_ref, _ = _reference(lopt, grad, state)
    d_fused, _ = hyperadam_step(lopt, grad, state, EPS)
    for a, b in zip(torch.autograd.grad(d_fused.square().sum(), list(lopt.parameters())),
                    torch.autograd.grad(d_ref.square().sum(), list(lopt.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_hyperadam_under_vmap_equals_the_batched_call():
    gen = torch.Generator().manual_seed(3)
    lopt = HyperAdam(num_candidates=4).double()
    grad = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    state = _random_state(lopt, (3,), 10, gen)
    batched_d, batched_state = hyperadam_step(lopt, grad, state, EPS)
    mapped_d, mapped_state = torch.func.vmap(lambda g, *s: hyperadam_step(lopt, g, s, EPS))(grad, *state)
    torch.testing.assert_close(mapped_d, batched_d)
    for a, b in zip(mapped_state, batched_state):
        torch.testing.assert_close(a, b)
    # and θ's gradient through vmap
    weights = [torch.randn(batched_d.shape, generator=gen, dtype=torch.float64)]
    g_batched = torch.autograd.grad((batched_d * weights[0]).sum(), list(lopt.parameters()))
    mapped_d = torch.func.vmap(lambda g, *s: hyperadam_step(lopt, g, s, EPS)[0])(grad, *state)
    g_mapped = torch.autograd.grad((mapped_d * weights[0]).sum(), list(lopt.parameters()))
    for a, b in zip(g_mapped, g_batched):
        torch.testing.assert_close(a, b)


def test_meta_layout_round_trip():
    lopt = HyperAdam(num_candidates=2)
    params = {"w": torch.randn(3, 4, 5), "b": torch.randn(3, 5), "z": torch.randn(3, 1)}
    state = type(lopt.init({"w": params["w"][0]}))(*({n: torch.randn(*p.shape, 2) for n, p in params.items()}
                                                     for _ in range(6)))
    fields = fused.to_meta_layout(state, list(params), lead=1)
    assert all(f.shape == (3, 4 * 5 + 5 + 1, 2) for f in fields)
    back = fused.from_meta_layout(fields, type(state), params, list(params), lead=1)
    for a, b in zip(back, state):
        for n in params:
            assert torch.equal(a[n], b[n])
    flat = fused.flatten_coordinates([params[n] for n in params], lead=1)
    assert torch.equal(flat[:, :20], params["w"].reshape(3, 20)) and torch.equal(flat[:, 25:], params["z"])


def _slots(task_count: int = 3) -> list[Slot]:
    base = meta_tasks.get_task("quadratic", dim=6)
    out = []
    for i in range(task_count):
        gen = torch.Generator().manual_seed(10 + i)
        task = hyperadam_tricks(base, gen, convex_k=3)
        params = task.init(gen)
        out.append(Slot(i, task, params, None, 0, torch.Generator().manual_seed(20 + i)))
    return out


@pytest.mark.parametrize("second_order", [False, True])
def test_fused_unroll_equals_the_reference_unroll(second_order):
    """Meta-losses, carried state and the meta-gradient of the fused path equal the vmapped reference's (float32)."""
    torch.manual_seed(0)
    lopt = HyperAdam(num_candidates=4)
    results = {}
    for use_fused in (False, True):
        slots = _slots()
        for s in slots:
            s.opt_state = lopt.init(s.params)
        out = unroll(lopt, slots, 4, lr=0.05, second_order=second_order, fused=use_fused)
        meta_grad = torch.autograd.grad(out.meta_losses.sum(), list(lopt.parameters()))
        results[use_fused] = (out, meta_grad)
    (ref, ref_grad), (fast, fast_grad) = results[False], results[True]
    torch.testing.assert_close(fast.meta_losses, ref.meta_losses, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in ref_grad)  # float32: entries that nearly cancel are compared in absolute
    for a, b in zip(fast_grad, ref_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    for state_a, state_b in zip(fast.opt_states, ref.opt_states):
        for field_a, field_b in zip(state_a, state_b):
            for n in field_b:
                torch.testing.assert_close(field_a[n], field_b[n], rtol=1e-5, atol=1e-6)


def test_hyperadam_ablations_without_lstm_or_preprocessing_take_the_reference_path():
    assert HyperAdam(num_candidates=2).has_fused_step
    for kwargs in (dict(use_lstm=False), dict(preprocess=False)):
        lopt = HyperAdam(num_candidates=2, **kwargs)
        assert not lopt.has_fused_step
        with pytest.raises(TypeError, match="no fused step"):
            lopt.fused_step(torch.zeros(1, 3), ())
        slots = _slots(2)
        for s in slots:
            s.opt_state = lopt.init(s.params)
        assert torch.isfinite(unroll(lopt, slots, 2, lr=0.05).meta_losses).all()


def test_compiled_fused_cell_equals_the_eager_one():
    """torch.compile (inductor) of both bodies: float32 rounding apart, the same outputs and gradients."""
    gen = torch.Generator().manual_seed(4)
    lopt = HyperAdam(num_candidates=4)
    grad = torch.randn(2, 33, generator=gen)
    state = _random_state(lopt, (2,), 33, gen, dtype=torch.float32)
    results = []
    for compiled in (False, True):
        d, new_state = hyperadam_step(lopt, grad, state, EPS, compiled=compiled)
        loss = d.square().sum() + sum(f.sum() for f in new_state)
        results.append((d, new_state, torch.autograd.grad(loss, list(lopt.parameters()))))
    assert not compiling.COMPILE_FAILED, compiling.COMPILE_FAILED
    (d0, s0, g0), (d1, s1, g1) = results
    torch.testing.assert_close(d1, d0, rtol=1e-4, atol=1e-5)
    for a, b in zip((*s1, *g1), (*s0, *g0)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_failing_compiler_falls_back_to_the_eager_cell(monkeypatch):
    def broken(*args):
        raise torch._dynamo.exc.BackendCompilerFailed(broken, RuntimeError("no C++ compiler"), None)

    eager = fused._EAGER["hyperadam"]
    monkeypatch.setitem(fused._COMPILED, "hyperadam", tuple(compiling.compile_with_fallback(broken, fn)
                                                            for fn in eager))
    failures = []
    monkeypatch.setattr(compiling, "COMPILE_FAILED", failures)
    monkeypatch.setattr(fused, "COMPILE_FAILED", failures)
    gen = torch.Generator().manual_seed(5)
    lopt = HyperAdam(num_candidates=2)
    grad = torch.randn(1, 7, generator=gen)
    state = _random_state(lopt, (1,), 7, gen, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        d, _ = hyperadam_step(lopt, grad, state, EPS, compiled=True)
    torch.testing.assert_close(d, hyperadam_step(lopt, grad, state, EPS)[0])
    assert failures


@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_batch_agnostic_optimizers_step_all_instances_at_once(name):
    """DMoptimizer and RNNprop have no reduction over the coordinates: their fused step is step_flat on the whole
    meta-batch, and the fused unroll equals the vmapped reference (meta-losses and meta-gradients)."""
    from metaopt.learned import DMOptimizer, RNNprop

    torch.manual_seed(0)
    lopt = {"dm": DMOptimizer, "rnnprop": RNNprop}[name](hidden_size=4)
    assert lopt.batch_agnostic and lopt.has_fused_step
    results = {}
    for use_fused in (False, True):
        slots = _slots()
        for s in slots:
            s.opt_state = lopt.init(s.params)
        out = unroll(lopt, slots, 3, lr=0.5, fused=use_fused)
        results[use_fused] = (out.meta_losses, torch.autograd.grad(out.meta_losses.sum(), list(lopt.parameters())))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in results[False][1])
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("layer", ["decay_beta", "decay_gamma"])
def test_a_decay_rate_saturated_at_one_on_the_first_step_stays_finite(layer):
    """β or γ exactly 1.0 in float32 on an instance's first step leaves β̂ = m = 0 (γ̂ = v = 0): the moment is 0, not
    0/0 (cells.ACCUMULATOR_EPS; the campaign's skipped meta-steps), in the reference, fused and compiled-free paths,
    and the meta-gradient through the step is finite."""
    torch.manual_seed(0)
    lopt = HyperAdam(num_candidates=4)
    with torch.no_grad():
        getattr(lopt, layer).bias[1] = 40.0  # σ(40) == 1.0 in float32
    assert torch.sigmoid(torch.tensor(40.0)) == 1.0
    grad = torch.randn(2, 30)
    state = [f.expand(2, *f.shape).clone() for f in lopt.init_flat(30, grad[0])]
    direction, _ = lopt.step_flat(grad[0], type(lopt.init_flat(30, grad[0]))(*(f[0] for f in state)))
    assert torch.isfinite(direction).all()
    fused_direction, _ = lopt.fused_step(grad, state)
    assert torch.isfinite(fused_direction).all()
    torch.testing.assert_close(fused_direction[0], direction)
    fused_direction.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in lopt.parameters() if p.grad is not None)


def test_compiled_bodies_do_not_recompile_for_requires_grad_and_allow_many_shapes(monkeypatch):
    """A task family that mixes learners meets many (coordinates, instances, requires_grad) combinations: outside
    grad mode the compiled bodies see detached tensors (requires_grad is not part of their guards), and the
    recompile limit is RECOMPILE_LIMIT, not dynamo's default 8; beyond it a call runs eagerly with a warning."""
    calls = []

    def body(grad, state, flag):
        calls.append((grad.requires_grad, state[0].requires_grad, torch._dynamo.config.recompile_limit))
        return grad + state[0]

    run = compiling.compile_with_fallback(body, body)
    monkeypatch.setattr(compiling, "COMPILE_FAILED", [])
    grad, state = torch.ones(3, requires_grad=True), (torch.ones(3, requires_grad=True),)
    with torch.no_grad():
        out = run(grad, state, True)
    assert calls[-1] == (False, False, compiling.RECOMPILE_LIMIT) and torch.equal(out, 2 * torch.ones(3))
    run(grad, state, True)  # in grad mode nothing is detached (a double backward differentiates the body)
    assert calls[-1][:2] == (True, True)

    def over_limit(*args):
        raise torch._dynamo.exc.FailOnRecompileLimitHit("limit")

    with pytest.warns(RuntimeWarning, match="recompile limit"):
        out = compiling.compile_with_fallback(over_limit, body)(grad, state, True)
    assert torch.allclose(out, 2 * torch.ones(3))
    assert not compiling.COMPILE_FAILED  # later calls still try the compiled body
