"""Learned optimizers: HyperAdam, DMoptimizer, RNNprop and the learnable CAM-HD γ / MARTHE μ rules, each registered
under its name (its pretrained weights, ``checkpoints/<name>``); ``make_optimizer`` of a checkpoint directory or of an
instance is :mod:`metaopt.checkpoint`'s."""

import torch

from metaopt.learned.base import (LEARNED_CLASSES, LEARNED_NAMES, CheckpointError, CoordinatewiseOptimizer,
                                  FrozenLearnedOptimizer, LearnedOptimizer, from_pretrained, register_learned,
                                  register_pretrained)
from metaopt.learned.dm import DMOptimizer
from metaopt.learned.hyperadam import HyperAdam
from metaopt.learned.rnnprop import RNNprop
from metaopt.learned.rules import FrozenGroupStateOptimizer, FrozenLearnedMarthe, LearnedGammaCAMHD, LearnedMuMARTHE
from metaopt.registry import register_optimizer


def _pretrained_factory(name: str):
    def make(params, lr: float | None = None, *, nonfinite: str = "skip", **face_options):
        return from_pretrained(name).frozen(params, lr=lr, nonfinite=nonfinite, **face_options)

    make.forwards_to = LearnedOptimizer.frozen  # face_options: checked against frozen()'s parameters
    make.__doc__ = (f"The pretrained {name!r} from checkpoints/{name}, frozen, as a torch.optim.Optimizer; "
                    "face_options go to its frozen() (fast=, compile=, kernel= for HyperAdam, DMoptimizer, RNNprop).")
    return make


# The class of each learned class's frozen face (what its frozen() builds): a learned name's record builds it, and
# reads from it what a step needs (metaopt.registry; tests/test_contract.py checks make_optimizer builds one).
FROZEN_FACES: dict[type[LearnedOptimizer], type[torch.optim.Optimizer]] = {
    HyperAdam: FrozenLearnedOptimizer, DMOptimizer: FrozenLearnedOptimizer, RNNprop: FrozenLearnedOptimizer,
    LearnedGammaCAMHD: FrozenGroupStateOptimizer, LearnedMuMARTHE: FrozenLearnedMarthe,
}

# Records: the contract tests build each name at its checkpoint's defaults (test_hparams {}; tests/test_learned.py
# covers the rest); no memory model (a learned rule's depends on its configuration: metaopt.bench.learned_byte_model).
for _name, _class in LEARNED_NAMES.items():
    register_optimizer(_name, kind="learned", builds=FROZEN_FACES[_class], test_hparams={})(_pretrained_factory(_name))


__all__ = ["LEARNED_CLASSES", "LEARNED_NAMES", "CheckpointError", "CoordinatewiseOptimizer", "FrozenLearnedOptimizer",
           "LearnedOptimizer", "from_pretrained", "register_learned", "register_pretrained", "DMOptimizer",
           "HyperAdam", "LearnedGammaCAMHD", "LearnedMuMARTHE", "RNNprop"]
