"""The fused Triton kernels of the frozen face (``kernel=True``, ``metaopt.learned.kernels``) against the reference
path (``fast=False``): equal within float32 rounding after several steps, for every supported configuration, across
row blocks (the last one partial), on zero, tiny and large gradients; resuming from either path; refusing what they do
not implement, with the reason.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); with CUDA they are compiled and run on the GPU, and the same tests hold.
"""

import copy

import pytest
import torch
from helpers import assert_nonfinite_step_is_skipped

import metaopt
from metaopt.learned import DMOptimizer, FrozenLearnedOptimizer, HyperAdam, LearnedGammaCAMHD, RNNprop, kernels

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIGS = {
    "hyperadam-J20": lambda: HyperAdam(num_candidates=20),   # the paper's cell
    "hyperadam-J5": lambda: HyperAdam(num_candidates=5),     # a width that is not a power of 2
    "hyperadam-J1": lambda: HyperAdam(num_candidates=1, init="adam"),
    "dm": DMOptimizer,
    "dm-3x5-raw": lambda: DMOptimizer(hidden_size=5, num_layers=3, preprocess=False),
    "dm-1x20": lambda: DMOptimizer(num_layers=1),
    "rnnprop": RNNprop,
    "rnnprop-1x7": lambda: RNNprop(hidden_size=7, num_layers=1),
}
# |kernel - reference| <= RTOL · scale per tensor (state: its largest entry; parameters: how far the reference moved
# them). The kernels sum products in another order and write tanh and ELU with exp: measured at most 9e-7 here after
# 4 steps (HyperAdam J = 20); 1e-4 still catches any wrong formula (a 1 % error in one weight is 1e-2).
RTOL = 1e-4


def model_for(seed=0):
    """Tensors of 35, 7, 21 and 3 coordinates plus one of 300: several row blocks, the last one partial."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 75)).to(DEVICE)


def gradients(model, gen, step):
    """Realistic gradients, with a zero tensor on the second step and a tiny / a large one on the third (DM's
    preprocessing switches branch at e^-10; RNNprop's and HyperAdam's normalizations see other scales)."""
    grads = [1e-2 * torch.randn(p.shape, generator=gen).to(DEVICE) for p in model.parameters()]
    if step == 1:
        grads[1].zero_()
    if step == 2:
        grads[0].mul_(1e-6)
        grads[2].mul_(1e3)
    return grads


def pair(name, lr=0.01):
    torch.manual_seed(1)
    lopt = CONFIGS[name]().to(DEVICE)
    ref_model, kernel_model = model_for(), model_for()
    return (ref_model, lopt.frozen(ref_model.parameters(), lr=lr, fast=False),
            kernel_model, lopt.frozen(kernel_model.parameters(), lr=lr, kernel=True))


def step_both(pairs, steps, seed=2):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        grads = None
        for model, opt in pairs:
            grads = gradients(model, gen, step) if grads is None else grads
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()


def assert_close(ref_model, ref, model, opt, initial):
    for p, q, q0 in zip(model.parameters(), ref_model.parameters(), initial):
        moved = float((q - q0).detach().abs().max())
        assert moved > 0 and float((p - q).detach().abs().max()) <= RTOL * moved
    a, b = opt.state_dict()["state"], ref.state_dict()["state"]
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].keys() == b[k].keys()
        for field, value in b[k].items():
            assert a[k][field].shape == value.shape
            assert float((a[k][field] - value).abs().max()) <= RTOL * float(value.abs().max()), (k, field)


@pytest.mark.parametrize("name", CONFIGS)
def test_kernel_step_equals_the_reference(name):
    ref_model, ref, model, opt = pair(name)
    initial = [q.detach().clone() for q in ref_model.parameters()]
    step_both([(ref_model, ref), (model, opt)], steps=4)
    assert_close(ref_model, ref, model, opt, initial)


def test_kernel_state_dict_round_trips_with_the_reference_path():
    ref_model, ref, model, opt = pair("hyperadam-J20")
    initial = [q.detach().clone() for q in ref_model.parameters()]
    step_both([(ref_model, ref), (model, opt)], steps=2)
    # the kernel face continues from the reference's state, and the reference from the kernel's, within rounding
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.copy_(q)
    step_both([(ref_model, ref), (model, opt)], steps=2, seed=3)
    assert_close(ref_model, ref, model, opt, initial)
    restarted = CONFIGS["hyperadam-J20"]().to(DEVICE).frozen(model_for().parameters(), fast=False)
    restarted.load_state_dict(opt.state_dict())  # same layout: the reference loads the kernel's state
    assert restarted.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_kernel_face_skips_nonfinite_gradients():
    _, _, model, opt = pair("rnnprop")
    step_both([(model, opt)], steps=1)
    assert_nonfinite_step_is_skipped(model, opt, fill=0.0)


def test_unsupported_configurations_are_refused_with_the_reason(monkeypatch):
    params = list(model_for().parameters())
    with pytest.raises(ValueError, match="Invalid kernel: True needs fast=True, compile=False"):
        HyperAdam().frozen(params, kernel=True, compile=True)
    with pytest.raises(ValueError, match="Invalid kernel"):
        HyperAdam().frozen(params, kernel=True, fast=False)
    with pytest.raises(ValueError, match="Invalid kernel"):
        FrozenLearnedOptimizer(params, LearnedGammaCAMHD(), kernel=True)
    with pytest.raises(ValueError, match=r"the paper's cell \(use_lstm=True, preprocess=True\)"):
        HyperAdam(use_lstm=False).to(DEVICE).frozen(params, kernel=True)
    with pytest.raises(ValueError, match="exceeds the kernels' 64"):
        DMOptimizer(hidden_size=65).to(DEVICE).frozen(params, kernel=True)
    with pytest.raises(ValueError, match="float32 parameters, got torch.float64"):
        RNNprop().to(DEVICE).double().frozen([p.detach().double().requires_grad_() for p in params], kernel=True)
    # a param group added later is checked when its state is built
    opt = HyperAdam().to(DEVICE).frozen(params[:1], kernel=True)
    opt.add_param_group({"params": [torch.zeros(3, dtype=torch.float64, device=DEVICE, requires_grad=True)]})
    opt.param_groups[1]["params"][0].grad = torch.ones(3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        opt.step()
    # compiled or interpreted is decided once per process; tensors of the other kind are refused
    monkeypatch.setattr(kernels, "_INTERPRETED", DEVICE.type == "cuda")
    with pytest.raises(ValueError, match="decides once per process"):
        HyperAdam().to(DEVICE).frozen(params, kernel=True)


def test_make_optimizer_forwards_kernel():
    opt = metaopt.make_optimizer(CONFIGS["dm"]().to(DEVICE), model_for().parameters(), kernel=True)
    assert opt.kernel and opt.fast
