"""Host reads per optimizer step (issue 15: "a test counts the synchronisations a step makes").

Each registered optimizer's step, after two warm-up steps, on a small float32 MLP, through its ``torch.optim`` face as
``make_optimizer`` builds it (the default path). The counts are today's, measured: a step that reads more fails, and
one that reads less must lower its entry. What remains is the non-finite guard every metaopt face keeps (one read:
``nonfinite="skip"`` must know before it writes), the HD family's rate kept as a Python float (its read doubles as
the guard), CAM-HD's group-level rates written back into ``param_groups`` (one read for all of them), and the
closure-driven MARTHE / RTHO / HD-val / TLR-naive, which check the training and validation gradients and, for MARTHE
and RTHO, the Hessian-vector product separately; the learned μ rule's frozen face reads its network's output back
into marthe's Python-float state (5: the most left), while the learned γ's face reads as cam-hd-*'s (2). The
parameter-free baselines are their packages' code, not counted.
"""

import math

import pytest
import torch

import metaopt
from metaopt.bench.syncs import HostReads, host_reads
from metaopt.core import step_needs
from metaopt.registry import records

HOST_READS = {
    "sgd": 1, "momentum": 1, "nesterov": 1, "adam": 1, "rmsprop": 1, "adagrad": 1, "adadelta": 1,
    "sgd-hd": 1, "sgdn-hd": 1, "adam-hd": 1, "cam-hd-sgd": 2, "cam-hd-sgdn": 2, "cam-hd-adam": 2,
    "marthe": 4, "rtho": 4, "hd-val": 3, "tlr": 1, "tlr-pl": 1, "tlr-naive": 3,
    "dm": 1, "hyperadam": 1, "hyperadam-general": 1, "rnnprop": 1, "cam-hd-learned-gamma": 2, "marthe-learned-mu": 5,
}
COUNTED = [r.name for r in records() if r.kind != "parameter-free"]


def test_every_counted_optimizer_has_an_entry():
    assert sorted(COUNTED) == sorted(HOST_READS)


@pytest.mark.parametrize("name", COUNTED)
def test_a_step_makes_its_measured_number_of_host_reads(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(32, 5), torch.randn(32, 2)
    opt = metaopt.make_optimizer(name, model.named_parameters(), **dict(metaopt.registry.record(name).test_hparams))
    closure_needed, val_needed = step_needs(opt)

    def closure():
        return torch.nn.functional.mse_loss(model(x), y)

    def step():
        if closure_needed:
            opt.step(closure, **({"val_closure": closure} if val_needed else {}))
        else:
            opt.step()

    counts = []
    for _ in range(3):
        if not closure_needed:
            opt.zero_grad()
            closure().backward()
        counts.append(host_reads(step))
    assert counts[-1] == HOST_READS[name], f"{name}: {counts[-1]} host reads per step (table: {HOST_READS[name]})"
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in model.parameters())


def test_the_counter_sees_every_kind_of_read():
    t = torch.tensor([1.5])
    with HostReads() as reads:
        bool(t)
        float(t)
        int(t)
        t.item()
        t.tolist()
        t.numpy()
        math.isfinite(t)
        [0, 1][torch.tensor(1)]
        torch.exp(t).sum()  # not a read
    assert reads.total == 8 and reads.counts["__float__"] == 2
