"""Learned optimizers: HyperAdam, DMoptimizer, RNNprop and the learnable CAM-HD γ / MARTHE μ rules."""

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch


from metaopt.learned.base import (LEARNED_CLASSES, LEARNED_NAMES, CheckpointError, CoordinatewiseOptimizer,
                                  FrozenLearnedOptimizer, LearnedOptimizer, from_pretrained, register_learned,
                                  register_pretrained)
from metaopt.learned.dm import DMOptimizer
from metaopt.learned.hyperadam import HyperAdam
from metaopt.learned.rnnprop import RNNprop
from metaopt.learned.rules import LearnedGammaCAMHD, LearnedMuMARTHE
from metaopt.registry import accepted_hyperparameters, check_hyperparameters, register_optimizer, register_source


def _pretrained_factory(name: str):
    def make(params, lr: float | None = None, *, nonfinite: str = "skip", **face_options):
        return from_pretrained(name).frozen(params, lr=lr, nonfinite=nonfinite, **face_options)

    make.forwards_to = LearnedOptimizer.frozen  # face_options: checked against frozen()'s parameters
    make.__doc__ = (f"The pretrained {name!r} from checkpoints/{name}, frozen, as a torch.optim.Optimizer; "
                    "face_options go to its frozen() (fast=, compile=, kernel= for HyperAdam, DMoptimizer, RNNprop).")
    return make


for _name in LEARNED_NAMES:
    register_optimizer(_name)(_pretrained_factory(_name))


@register_source
def _learned_source(name: Any, params: Iterable[Any], hparams: Mapping[str, Any]) -> torch.optim.Optimizer | None:
    """``make_optimizer`` of a ``LearnedOptimizer`` instance (frozen) or of a checkpoint directory (a path, or a
    string naming an existing path that is not a registered name); None for anything else."""
    if isinstance(name, LearnedOptimizer):
        label, lopt = type(name).__name__, name
    elif isinstance(name, os.PathLike) or (isinstance(name, str) and Path(name).exists()):
        label, lopt = str(name), None
    else:
        return None
    hparams = check_hyperparameters(label, accepted_hyperparameters(LearnedOptimizer.frozen), hparams)
    return (lopt if lopt is not None else from_pretrained(name)).frozen(params, **hparams)

__all__ = ["LEARNED_CLASSES", "LEARNED_NAMES", "CheckpointError", "CoordinatewiseOptimizer", "FrozenLearnedOptimizer",
           "LearnedOptimizer", "from_pretrained", "register_learned", "register_pretrained", "DMOptimizer",
           "HyperAdam", "LearnedGammaCAMHD", "LearnedMuMARTHE", "RNNprop"]
