"""The fast path of the frozen face (``metaopt.learned.fast``) against the reference path (``fast=False``).

Eager flat steps are the reference bit for bit, in float64 and float32: the same parameters and the same
``state_dict()`` after every step, whatever happens between steps (param groups and LR schedules, parameters that lose
and regain their gradient, a state entry replaced by the user, ``load_state_dict`` from either path, skipped
non-finite steps). Compiled steps (``test_compiled_*``, deselect with ``-k "not compiled"``; together under 40 s on a
busy CPU with a cold inductor cache) equal the reference within float32 rounding and resume exactly.
"""

import copy

import pytest
import torch
from helpers import assert_nonfinite_step_is_skipped, requires_compiler

import metaopt
from metaopt.learned import DMOptimizer, FrozenLearnedOptimizer, HyperAdam, LearnedGammaCAMHD, RNNprop

FACTORIES = {
    "hyperadam": lambda: HyperAdam(num_candidates=4),
    "dm": DMOptimizer,
    "rnnprop": RNNprop,
}
NAMES = list(FACTORIES)

# Compiled vs eager, float32: |compiled - reference| <= RTOL * max|reference| per tensor (state fields; for the
# parameters, relative to how far they moved). Fused kernels round differently (reductions reordered, exp / tanh /
# sigmoid evaluated by other code): a few ulp per operation, carried through five steps of an LSTM. Measured here:
# at most 4e-7 (about 3 float32 ulp of the largest entry); 1e-4 leaves a margin of 250 and still catches a wrong
# formula (a 1 % error in lr alone is 1e-2).
RTOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few dozen coordinates: a second intra-op thread only contends for a busy CPU (a 1.5 ms step took
    95 ms with torch's default of two threads here, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_lopt(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return FACTORIES[name]().to(dtype)


def small_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def set_grads(model, gen, skip=()):
    """Random gradients of a realistic scale on every parameter but those whose index is in ``skip`` (no gradient)."""
    for i, p in enumerate(model.parameters()):
        p.grad = None if i in skip else 1e-2 * torch.randn(p.shape, generator=gen, dtype=p.dtype)


def run(model, opt, steps, seed=1, skip=lambda step: ()):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        set_grads(model, gen, skip(step))
        opt.step()


def assert_same_state(opt_a, opt_b):
    """Identical state_dicts: the same entries, shapes, dtypes and bits, and the same param groups."""
    a, b = opt_a.state_dict(), opt_b.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for field, value in a["state"][k].items():
            assert value.dtype == b["state"][k][field].dtype
            assert torch.equal(value, b["state"][k][field]), (k, field)


def assert_same_params(model_a, model_b):
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


def pair(name, dtype=torch.float32, params=lambda model: model.parameters(), **fast_options):
    """Two identical models with the same θ: one with the reference face, one with the fast face."""
    lopt = make_lopt(name, dtype)
    ref_model, fast_model = small_model(dtype), small_model(dtype)
    ref = lopt.frozen(params(ref_model), lr=0.01, fast=False)
    fast = lopt.frozen(params(fast_model), lr=0.01, **fast_options)
    return ref_model, ref, fast_model, fast


# ---------------------------------------------------------------------------------------------------------------------
# Eager flat path: the reference bit for bit


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_is_the_reference_bit_for_bit(name, dtype):
    ref_model, ref, fast_model, fast = pair(name, dtype)
    assert fast.fast and not ref.fast
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        set_grads(ref_model, gen_a)
        set_grads(fast_model, gen_b)
        ref.step()
        fast.step()
        assert_same_params(ref_model, fast_model)
        assert_same_state(ref, fast)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_one_flat_buffer_per_field_viewed_in_place(name):
    model = small_model()
    opt = make_lopt(name).frozen(model.parameters(), lr=0.01)
    run(model, opt, 2)
    params = list(model.parameters())
    views = {id(p): dict(opt.state[p]) for p in params}
    n = sum(p.numel() for p in params)
    for field in views[id(params[0])]:
        buffer = opt.state[params[0]][field]
        width = buffer.shape[-1]
        start = 0
        for p in params:  # group order, contiguous, shaped like p plus the width
            view = opt.state[p][field]
            assert view.shape == (*p.shape, width)
            assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
            assert view.storage_offset() == start * width
            start += p.numel()
        assert start == n
    run(model, opt, 3, seed=2)
    for p in params:  # later steps write into the same buffers: no reallocation, no re-viewing
        assert all(opt.state[p][f] is v for f, v in views[id(p)].items())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["reference-to-fast", "fast-to-reference"])
def test_state_dict_loads_across_paths_bit_for_bit(name, direction):
    lopt = make_lopt(name)
    straight_model = small_model()
    straight = lopt.frozen(straight_model.parameters(), lr=0.01, fast=False)
    run(straight_model, straight, 3, seed=1)
    run(straight_model, straight, 3, seed=2)

    first_fast, second_fast = direction == "fast-to-reference", direction == "reference-to-fast"
    model = small_model()
    first = lopt.frozen(model.parameters(), lr=0.01, fast=first_fast)
    run(model, first, 3, seed=1)
    saved = copy.deepcopy(first.state_dict())
    second = lopt.frozen(model.parameters(), lr=0.01, fast=second_fast)
    second.load_state_dict(saved)
    run(model, second, 3, seed=2)
    assert_same_params(straight_model, model)
    assert_same_state(straight, second)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_into_a_running_fast_face_rebuilds_its_buffers(name):
    lopt = make_lopt(name)
    ref_model, fast_model = small_model(), small_model()
    ref = lopt.frozen(ref_model.parameters(), lr=0.01, fast=False)
    fast = lopt.frozen(fast_model.parameters(), lr=0.01)
    run(ref_model, ref, 2, seed=1)
    run(fast_model, fast, 4, seed=3)  # a different history, then the reference's state is loaded
    fast.load_state_dict(copy.deepcopy(ref.state_dict()))
    fast_model.load_state_dict(ref_model.state_dict())
    run(ref_model, ref, 3, seed=2)
    run(fast_model, fast, 3, seed=2)
    assert_same_params(ref_model, fast_model)
    assert_same_state(ref, fast)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_losing_and_regaining_their_gradient(name):
    ref_model, ref, fast_model, fast = pair(name)
    # step 0: all; steps 1-2: the first layer's weight has no gradient; step 3: all again; step 4: only the last bias
    pattern = {1: (0,), 2: (0,), 4: (0, 1, 2)}
    run(ref_model, ref, 5, skip=lambda s: pattern.get(s, ()))
    run(fast_model, fast, 5, skip=lambda s: pattern.get(s, ()))
    assert_same_params(ref_model, fast_model)
    assert_same_state(ref, fast)
    # the frozen state of a parameter left out does not keep the old flat buffers alive
    stepped = list(fast_model.parameters())[3]
    for p in list(fast_model.parameters())[:3]:
        for field, value in fast.state[p].items():
            assert value.untyped_storage().data_ptr() != fast.state[stepped][field].untyped_storage().data_ptr()
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size()


@pytest.mark.parametrize("name", NAMES)
def test_a_state_entry_replaced_by_the_user_is_used(name):
    ref_model, ref, fast_model, fast = pair(name)
    run(ref_model, ref, 2)
    run(fast_model, fast, 2)
    for opt, model in ((ref, ref_model), (fast, fast_model)):
        p = model[0].weight
        field = next(iter(opt.state[p]))
        opt.state[p][field] = 0.5 * opt.state[p][field]  # a new tensor, not a write into the old one
    run(ref_model, ref, 3, seed=2)
    run(fast_model, fast, 3, seed=2)
    assert_same_params(ref_model, fast_model)
    assert_same_state(ref, fast)


def test_param_groups_and_an_lr_schedule():
    def groups(model):
        return [{"params": model[0].parameters(), "lr": 0.02}, {"params": model[2].parameters()}]

    ref_model, ref, fast_model, fast = pair("hyperadam", params=groups)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.9 ** step) for opt in (ref, fast)]
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(4):
        set_grads(ref_model, gen_a)
        set_grads(fast_model, gen_b)
        for opt, schedule in zip((ref, fast), schedules):
            opt.step()
            schedule.step()
    assert_same_params(ref_model, fast_model)
    assert_same_state(ref, fast)


def test_explicit_gradients_of_step_group():
    ref_model, ref, fast_model, fast = pair("hyperadam", params=lambda m: m.named_parameters())
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        grads = {n: 1e-2 * torch.randn(p.shape, generator=gen) for n, p in ref_model.named_parameters()
                 if step != 1 or n.startswith("2.")}
        with torch.no_grad():
            assert ref.step_group(ref.param_groups[0], grads)
            assert fast.step_group(fast.param_groups[0], grads)
    assert_same_params(ref_model, fast_model)
    assert_same_state(ref, fast)


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_is_skipped_and_raised_as_in_the_reference(name):
    model = small_model()
    opt = make_lopt(name).frozen(model.parameters(), lr=0.01)
    run(model, opt, 2)
    assert_nonfinite_step_is_skipped(model, opt, fill=0.0)
    # a skipped first step creates no state, as in the reference
    ref_model, ref, fast_model, fast = pair(name)
    for model, opt in ((ref_model, ref), (fast_model, fast)):
        for p in model.parameters():
            p.grad = torch.full_like(p, float("inf"))
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step()
    assert_same_state(ref, fast)
    assert not fast.state_dict()["state"]
    raising = make_lopt(name).frozen(fast_model.parameters(), lr=0.01, nonfinite="raise")
    before = [p.clone() for p in fast_model.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite"):
        raising.step()
    assert all(torch.equal(p, q) for p, q in zip(fast_model.parameters(), before))


def test_sparse_gradients_are_refused():
    model = small_model()
    opt = make_lopt("hyperadam").frozen(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients \(parameter '0'\)"):
        opt.step()


def test_options_are_validated_and_reach_the_face():
    model = small_model()
    lopt = make_lopt("hyperadam")
    with pytest.raises(ValueError, match="Invalid compile"):
        lopt.frozen(model.parameters(), compile=True, fast=False)
    with pytest.raises(ValueError, match="Invalid compile: 1.5 .expected True, False, 'auto' or a torch.compile"):
        lopt.frozen(model.parameters(), compile=1.5)
    with pytest.raises(ValueError, match="Invalid compile"):
        FrozenLearnedOptimizer(model.parameters(), LearnedGammaCAMHD(), compile=True)
    assert not LearnedGammaCAMHD().frozen(model.parameters()).fast  # not coordinatewise: the reference path
    # make_optimizer forwards the face's options (nothing compiles before the first step)
    opt = metaopt.make_optimizer("hyperadam", model.parameters(), compile=True)
    assert opt.fast and opt.compile is True
    opt = metaopt.make_optimizer(lopt, model.parameters(), compile="reduce-overhead")
    assert opt.compile == "reduce-overhead"
    assert not metaopt.make_optimizer("hyperadam", model.parameters(), fast=False).fast


# ---------------------------------------------------------------------------------------------------------------------
# Compiled steps


def assert_close_to_reference(model, opt, ref_model, ref, initial):
    for p, q, p0 in zip(model.parameters(), ref_model.parameters(), initial):
        moved = (q - p0).abs().max()
        assert moved > 0 and (p - q).abs().max() <= RTOL * moved
    a, b = opt.state_dict()["state"], ref.state_dict()["state"]
    assert a.keys() == b.keys()
    for k in b:
        for field, value in b[k].items():
            assert (a[k][field] - value).abs().max() <= RTOL * value.abs().max(), (k, field)


@requires_compiler
@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_equals_the_reference(name):
    ref_model, ref, model, opt = pair(name, compile=True)
    initial = [p.detach().clone() for p in model.parameters()]
    run(ref_model, ref, 5)
    run(model, opt, 5)
    assert_close_to_reference(model, opt, ref_model, ref, initial)


@requires_compiler
def test_compiled_state_dict_round_trip_resumes_exactly_without_recompiling_for_lr():
    from torch._dynamo.utils import counters

    lopt = make_lopt("hyperadam")
    straight_model, model = small_model(), small_model()
    straight = lopt.frozen(straight_model.parameters(), lr=0.01, compile=True)
    run(straight_model, straight, 3, seed=1)
    graphs = counters["stats"]["unique_graphs"]
    straight.param_groups[0]["lr"] = 0.005  # lr is a tensor input of the compiled step: no new graph
    run(straight_model, straight, 3, seed=2)
    assert counters["stats"]["unique_graphs"] == graphs

    first = lopt.frozen(model.parameters(), lr=0.01, compile=True)
    run(model, first, 3, seed=1)
    saved = copy.deepcopy(first.state_dict())
    second = lopt.frozen(model.parameters(), lr=0.01, compile=True)
    second.load_state_dict(saved)
    second.param_groups[0]["lr"] = 0.005
    run(model, second, 3, seed=2)
    assert_same_params(straight_model, model)
    assert_same_state(straight, second)


@requires_compiler
def test_the_default_face_compiles_large_groups_on_a_cpu_and_steps_small_ones_eagerly(monkeypatch):
    """compile="auto" (the default): a param group of AUTO_COMPILE_COORDINATES coordinates or more steps through the
    compiled step on a CPU (equal to the reference within float32 rounding), a smaller one eagerly (bit for bit);
    where nothing can be compiled (fast=False, a learner that is not coordinatewise) the default is quietly eager."""
    from metaopt.learned import base

    ref_model, ref, model, opt = pair("hyperadam")
    assert opt.compile == "auto"
    run(ref_model, ref, 3)
    run(model, opt, 3)
    assert not opt.compiled
    assert_same_params(ref_model, model)

    monkeypatch.setattr(base, "AUTO_COMPILE_COORDINATES", sum(p.numel() for p in model.parameters()))
    ref_model, ref, model, opt = pair("hyperadam")
    initial = [p.detach().clone() for p in model.parameters()]
    run(ref_model, ref, 5)
    run(model, opt, 5)
    assert opt.compiled
    assert_close_to_reference(model, opt, ref_model, ref, initial)

    assert make_lopt("hyperadam").frozen(model.parameters(), fast=False).compile is False
    assert not LearnedGammaCAMHD().frozen(model.parameters()).compiled


@requires_compiler
def test_faces_of_one_learned_optimizer_share_its_compiled_step():
    """A second face of the same learned optimizer over parameters of a shape already met compiles nothing (an
    evaluation builds a face per seed); another learned optimizer has its own compiled step (and cache of graphs)."""
    from torch._dynamo.utils import counters

    lopt, other = make_lopt("hyperadam"), make_lopt("hyperadam")
    first_model, second_model = small_model(), small_model()
    first = lopt.frozen(first_model.parameters(), lr=0.01, compile=True)
    run(first_model, first, 2, seed=1)
    graphs = counters["stats"]["unique_graphs"]
    second = lopt.frozen(second_model.parameters(), lr=0.01, compile=True)
    run(second_model, second, 2, seed=1)
    assert counters["stats"]["unique_graphs"] == graphs
    assert second._flat_step is first._flat_step
    assert_same_params(first_model, second_model)
    assert other.frozen(small_model().parameters(), compile=True)._flat_step is not first._flat_step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_cuda_flat_is_exact_and_cuda_graphs_take_no_copies():
    from torch._dynamo.utils import counters

    lopt = make_lopt("hyperadam")
    ref_model, flat_model, graph_model = small_model().cuda(), small_model().cuda(), small_model().cuda()
    ref = lopt.frozen(ref_model.parameters(), lr=0.01, fast=False)
    flat = lopt.frozen(flat_model.parameters(), lr=0.01)
    graphed = lopt.frozen(graph_model.parameters(), lr=0.01, compile="reduce-overhead")
    initial = [p.detach().clone() for p in graph_model.parameters()]
    skips = counters["inductor"]["cudagraph_skips"]
    copied = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    for model, opt in ((ref_model, ref), (flat_model, flat), (graph_model, graphed)):
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in model.parameters():
                p.grad = 1e-2 * torch.randn(p.shape, generator=gen).cuda()
            opt.step()
    assert_same_params(ref_model, flat_model)
    assert_same_state(ref, flat)
    assert_close_to_reference(graph_model, graphed, ref_model, ref, initial)
    # every input of the graph is static (θ, the flat buffers, -lr): CUDA graphs ran, writing the state in place
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == copied
