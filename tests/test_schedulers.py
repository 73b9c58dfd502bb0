"""LR schedulers work on every registered optimizer (issue 15: "param_groups[i]['lr'] stays readable and LR schedulers
keep working").

``StepLR(gamma=0.1)`` after each of two steps cuts ``param_groups[i]["lr"]`` to a hundredth; the third step's update
must shrink with it against the same run without the scheduler: by ~100x where the rate scales the step directly
(hypergradient methods adapt their rates by a little on top), by at least half for the parameter-free packages, whose
``lr`` multiplies their own step-size estimate. ``tlr-pl`` keeps one rate per tensor and refuses a changed group rate
with an error that says so.
"""

import pytest
import torch

import metaopt
from metaopt.core import step_needs
from metaopt.registry import record, records


def third_update(name, scheduled):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(32, 5), torch.randn(32, 2)
    opt = metaopt.make_optimizer(name, model.named_parameters(), **dict(record(name).test_hparams))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1) if scheduled else None
    closure_needed, val_needed = step_needs(opt)

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    for t in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        if closure_needed:
            opt.step(closure, **({"val_closure": closure} if val_needed else {}))
        else:
            opt.zero_grad()
            closure().backward()
            opt.step()
        if scheduler is not None and t < 2:
            scheduler.step()
    assert isinstance(opt.param_groups[0]["lr"], float)
    return sum(float((p.detach() - b).abs().sum()) for p, b in zip(model.parameters(), before)), opt


@pytest.mark.parametrize("name", [r.name for r in records() if r.name != "tlr-pl"])
def test_a_step_lr_schedule_scales_the_update(name):
    plain, _ = third_update(name, False)
    scheduled, opt = third_update(name, True)
    assert opt.param_groups[0]["lr"] < 0.02 * third_update(name, False)[1].param_groups[0]["lr"]
    ratio = scheduled / plain
    if record(name).kind == "parameter-free":
        assert ratio < 0.5, f"{name}: the update kept {ratio:.3g} of its size"
    else:
        assert 0.002 < ratio < 0.05, f"{name}: the update changed by {ratio:.3g} (the schedule: 0.01)"


def test_tlr_pl_refuses_a_schedule_and_says_why():
    with pytest.raises(RuntimeError, match="Do not use an LR scheduler with tlr-pl"):
        third_update("tlr-pl", True)
