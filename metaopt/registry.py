"""The optimizer registry: every optimizer name resolves to a factory here, and ``make_optimizer`` builds it.

A new optimizer is one ``@register_optimizer("name")`` on a factory ``(params, **hparams) -> torch.optim.Optimizer``;
contract tests iterate the registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

OptimizerFactory = Callable[..., torch.optim.Optimizer]

_FACTORIES: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator: register ``factory`` under ``name`` (unique)."""

    def decorate(factory: OptimizerFactory) -> OptimizerFactory:
        if name in _FACTORIES:
            raise ValueError(f"optimizer {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorate


def registered_names() -> tuple[str, ...]:
    """Every registered optimizer name, in registration order."""
    return tuple(_FACTORIES)


def make_optimizer(name: Any, params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
    """Build an optimizer over ``params`` with the given hyper-parameters.

    ``name`` is a registered name (``metaopt.OPTIMIZERS``; a learned name loads its pretrained weights from
    ``checkpoints/<name>``), a checkpoint directory (``str`` or ``os.PathLike``), or a ``LearnedOptimizer`` instance
    (used frozen). ``params`` is anything ``torch.optim`` accepts: ``model.parameters()``,
    ``model.named_parameters()`` or a list of param-group dicts. Unknown names raise ``ValueError`` listing the valid
    ones; invalid hyper-parameters raise ``ValueError`` naming the argument (from the optimizer's constructor).
    """
    from metaopt.learned import LearnedOptimizer, from_pretrained

    if isinstance(name, LearnedOptimizer):
        return name.frozen(params, **hparams)
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name not in _FACTORIES and Path(name).exists()):
        return from_pretrained(name).frozen(params, **hparams)
    if not isinstance(name, str):
        raise TypeError(f"make_optimizer expects a name, a checkpoint directory or a LearnedOptimizer, "
                        f"got {type(name).__name__}")
    try:
        factory = _FACTORIES[name]
    except KeyError:
        valid = ", ".join(_FACTORIES)
        raise ValueError(f"Unknown optimizer {name!r}. Valid names: {valid}") from None
    return factory(params, **hparams)
