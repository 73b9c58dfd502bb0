"""Issue 16, part 4: every registered name rejects an unknown hyper-parameter with the valid ones (closest first),
a wrongly typed value with the expected type, accepts a redundant-but-consistent argument and rejects a contradictory
one — all before anything is built or loaded."""

from __future__ import annotations

import pytest
import torch

import metaopt
from metaopt.registry import hyperparameters


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize("name", metaopt.OPTIMIZERS)
def test_an_unknown_hyperparameter_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match=f"Unknown hyper-parameter 'not_a_setting' for optimizer '{name}'") as info:
        metaopt.make_optimizer(name, _params(), not_a_setting=1)
    listed = str(info.value).split(": ", 1)[1].split(", ")
    assert sorted(listed) == sorted(hyperparameters(name)) and "lr" in listed


@pytest.mark.parametrize("name", metaopt.OPTIMIZERS)
def test_a_wrongly_typed_learning_rate_names_the_argument_and_the_type(name):
    with pytest.raises(ValueError, match=f"Invalid lr for optimizer '{name}': expected .*float.*, got str 'x'"):
        metaopt.make_optimizer(name, _params(), lr="x")


def test_the_closest_name_comes_first():
    with pytest.raises(ValueError, match=r"closest first\): hypergrad_lr, ") as info:
        metaopt.make_optimizer("adam-hd", _params(), hypergrad=1e-3)
    assert "TypeError" not in repr(info.value)


def test_wrong_types_of_other_arguments():
    with pytest.raises(ValueError, match=r"Invalid betas for optimizer 'adam': expected tuple\[float, float\]"):
        metaopt.make_optimizer("adam", _params(), betas=0.9)
    with pytest.raises(ValueError, match="Invalid nesterov for optimizer 'sgd-hd': expected bool"):
        metaopt.make_optimizer("sgd-hd", _params(), lr=0.1, momentum=0.9, nesterov="yes")
    for ok in (dict(lr=1), dict(lr=torch.tensor(0.01)), dict(betas=[0.9, 0.99])):  # ints, tensors, lists pass
        metaopt.make_optimizer("adam", _params(), **ok)


def test_redundant_but_consistent_arguments_are_accepted_and_contradictory_ones_rejected():
    plain = metaopt.make_optimizer("nesterov", _params(), lr=0.1, momentum=0.9)
    redundant = metaopt.make_optimizer("nesterov", _params(), lr=0.1, momentum=0.9, nesterov=True)
    assert redundant.param_groups[0]["nesterov"] is True and plain.param_groups[0]["nesterov"] is True
    with pytest.raises(ValueError, match="Contradictory hyper-parameter for optimizer 'nesterov': it fixes "
                                         "nesterov=True, got nesterov=False"):
        metaopt.make_optimizer("nesterov", _params(), lr=0.1, nesterov=False)
    metaopt.make_optimizer("tlr-pl", _params(), per_tensor=True)
    with pytest.raises(ValueError, match="Contradictory"):
        metaopt.make_optimizer("tlr", _params(), per_tensor=True)


def test_checkpoint_directories_and_instances_are_checked_too(tmp_path):
    from metaopt.learned import HyperAdam

    lopt = HyperAdam(num_candidates=2)
    directory = lopt.save_pretrained(tmp_path / "h")
    for source in (lopt, directory, str(directory)):
        with pytest.raises(ValueError, match="Unknown hyper-parameter 'momentum'"):
            metaopt.make_optimizer(source, _params(), momentum=0.9)
        with pytest.raises(ValueError, match="Invalid lr"):
            metaopt.make_optimizer(source, _params(), lr="x")
