"""Checks shared by several test modules (imported as ``from helpers import ...``: pytest puts tests/ on the path)."""

import copy
import shutil

import pytest
import torch

# torch.compile's CPU backend (inductor) builds C++: tests of compiled paths need a compiler
requires_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                       reason="torch.compile's CPU backend needs a C++ compiler")


def assert_nonfinite_step_is_skipped(model, opt, fill=1.0):
    """Give every parameter a gradient holding one NaN, step, and check that nothing moved: the parameters, every
    per-parameter state entry, and that the skip was counted once. Returns the state dicts before and after, for
    the caller's own checks of group-level state."""
    params_before = [p.clone() for p in model.parameters()]
    before = copy.deepcopy(opt.state_dict())
    for p in model.parameters():
        p.grad = torch.full_like(p, fill)
    next(model.parameters()).grad.view(-1)[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
    after = opt.state_dict()
    assert after["param_groups"][0]["nonfinite_skipped"] == before["param_groups"][0].get("nonfinite_skipped", 0) + 1
    for k, st in before["state"].items():
        for field, v in st.items():
            assert torch.equal(after["state"][k][field], v) if isinstance(v, torch.Tensor) \
                else after["state"][k][field] == v
    return before, after


def assert_same_parameters_and_state(model_a, opt_a, model_b, opt_b):
    """Two runs that must agree bit for bit: the same parameters, param_groups and per-parameter state. Returns both
    state dicts (for a crossed resume)."""
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    a, b = opt_a.state_dict(), opt_b.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, state in a["state"].items():
        for k, value in state.items():
            other = b["state"][i][k]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (i, k)
    return a, b
