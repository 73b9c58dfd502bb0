"""Checkpoints of learned optimizers: the file format and the one resolution of what names a learned optimizer.

The checkpoint layer of ``../shared/DESIGN.md`` ("Architecture"): above the learned optimizers, below meta-training,
the evaluation and the model cards (:mod:`metaopt.cards`, which the command line below runs).

* The format: a directory holding ``config.json`` (class, constructor arguments, format version) and
  ``model.safetensors`` (θ only, never a pickle), written by ``LearnedOptimizer.save_pretrained`` and read by
  :func:`from_pretrained`, with ``golden.json`` (:data:`GOLDEN_FILE`) and a model card beside it in the committed
  ones. The reading and writing live beside the classes they rebuild (:mod:`metaopt.learned.base`: a learned name's
  registry record loads its weights with them) and are this package's names here.
* :func:`learned_optimizer`: the ``LearnedOptimizer`` behind whatever names one (an instance, a checkpoint directory,
  a registered learned name), for ``make_optimizer`` (the registry source registered here) and for the evaluation's
  batched runs alike; :func:`resolve_checkpoint` is its directory lookup.

``python -m metaopt.checkpoint DIR`` (re)writes a checkpoint's golden fingerprint and, with ``--card``, its model card
(:mod:`metaopt.checkpoint.__main__`, in the last layer with :mod:`metaopt.cards`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from metaopt.learned.base import (CARD_FILE, CHECKPOINT_ROOT, CONFIG_FILE, FORMAT_VERSION, GOLDEN_FILE, LEARNED_NAMES,
                                  PICKLE_SUFFIXES, WEIGHTS_FILE, CheckpointError, LearnedOptimizer, checkpoint_root,
                                  fingerprint, from_pretrained, resolve_checkpoint)
from metaopt.registry import (accepted_hyperparameters, check_hyperparameters, register_source,
                              registered_names)

__all__ = ["CARD_FILE", "CHECKPOINT_ROOT", "CONFIG_FILE", "FORMAT_VERSION", "GOLDEN_FILE", "LEARNED_NAMES",
           "PICKLE_SUFFIXES", "WEIGHTS_FILE", "CheckpointError", "checkpoint_root", "fingerprint", "from_pretrained",
           "is_checkpoint_path", "learned_optimizer", "resolve_checkpoint"]


def is_checkpoint_path(source: Any) -> bool:
    """Whether ``source`` names a checkpoint by its path: an ``os.PathLike``, or a string naming an existing path
    that is not a registered optimizer name (a registered name means its record, even where a directory of that name
    exists)."""
    return isinstance(source, os.PathLike) or (isinstance(source, str) and source not in registered_names()
                                               and Path(source).exists())


def learned_optimizer(source: Any, map_location: str | torch.device = "cpu") -> LearnedOptimizer | None:
    """The ``LearnedOptimizer`` behind ``source``: an instance itself; a checkpoint path
    (:func:`is_checkpoint_path`) or a registered learned name (``checkpoints/<name>``, :data:`LEARNED_NAMES`) loaded
    with :func:`from_pretrained` onto ``map_location`` (frozen, in eval mode); ``None`` for anything else (a
    hand-designed optimizer's name). A path that is no checkpoint directory raises :class:`CheckpointError`."""
    if isinstance(source, LearnedOptimizer):
        return source
    if is_checkpoint_path(source) or (isinstance(source, str) and source in LEARNED_NAMES):
        return from_pretrained(source, map_location=map_location)
    return None


@register_source
def _checkpoint_source(name: Any, params: Iterable[Any], hparams: Mapping[str, Any]) -> torch.optim.Optimizer | None:
    """``make_optimizer`` of a ``LearnedOptimizer`` instance or a checkpoint path (never a registered name: those
    are records), frozen; None for anything else. The hyper-parameters are checked before anything is loaded."""
    if isinstance(name, LearnedOptimizer):
        label = type(name).__name__
    elif is_checkpoint_path(name):
        label = str(name)
    else:
        return None
    hparams = check_hyperparameters(label, accepted_hyperparameters(LearnedOptimizer.frozen), hparams)
    return learned_optimizer(name).frozen(params, **hparams)
