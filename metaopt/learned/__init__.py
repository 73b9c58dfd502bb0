"""Learned optimizers: HyperAdam, DMoptimizer, RNNprop and the learnable CAM-HD γ / MARTHE μ rules."""

from metaopt.learned.base import (LEARNED_CLASSES, LEARNED_NAMES, CheckpointError, CoordinatewiseOptimizer,
                                  FrozenLearnedOptimizer, LearnedOptimizer, from_pretrained, register_learned,
                                  register_pretrained)
from metaopt.learned.dm import DMOptimizer
from metaopt.learned.hyperadam import HyperAdam
from metaopt.learned.rnnprop import RNNprop
from metaopt.learned.rules import LearnedGammaCAMHD, LearnedMuMARTHE
from metaopt.registry import register_optimizer


def _pretrained_factory(name: str):
    def make(params, lr: float | None = None, *, nonfinite: str = "skip", **face_options):
        return from_pretrained(name).frozen(params, lr=lr, nonfinite=nonfinite, **face_options)

    make.forwards_to = LearnedOptimizer.frozen  # face_options: checked against frozen()'s parameters
    make.__doc__ = (f"The pretrained {name!r} from checkpoints/{name}, frozen, as a torch.optim.Optimizer; "
                    "face_options go to its frozen() (fast=, compile=, kernel= for HyperAdam, DMoptimizer, RNNprop).")
    return make


for _name in LEARNED_NAMES:
    register_optimizer(_name)(_pretrained_factory(_name))

__all__ = ["LEARNED_CLASSES", "LEARNED_NAMES", "CheckpointError", "CoordinatewiseOptimizer", "FrozenLearnedOptimizer",
           "LearnedOptimizer", "from_pretrained", "register_learned", "register_pretrained", "DMOptimizer",
           "HyperAdam", "LearnedGammaCAMHD", "LearnedMuMARTHE", "RNNprop"]
