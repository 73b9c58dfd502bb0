"""The optimizer registry: every optimizer name resolves to a factory here, and ``make_optimizer`` builds it.

A new optimizer is one ``@register_optimizer("name")`` on a factory ``(params, **hparams) -> torch.optim.Optimizer``;
contract tests iterate the registry.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import numbers
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

OptimizerFactory = Callable[..., torch.optim.Optimizer]

_FACTORIES: dict[str, OptimizerFactory] = {}
_FIXED: dict[str, dict[str, Any]] = {}
# What make_optimizer asks when ``name`` is not a registered name: ``source(name, params, hparams)`` builds an
# optimizer from another kind of name (a checkpoint directory, a learned-optimizer instance: metaopt.learned registers
# that one) or returns None. The registry stays a leaf: implementations register into it.
OptimizerSource = Callable[[Any, Iterable[Any], Mapping[str, Any]], "torch.optim.Optimizer | None"]
_SOURCES: list[OptimizerSource] = []


def register_source(source: OptimizerSource) -> OptimizerSource:
    """Add a builder for names that are not registered (see ``_SOURCES``); returns it (usable as a decorator)."""
    _SOURCES.append(source)
    return source


def register_optimizer(name: str, fixed: Mapping[str, Any] | None = None
                       ) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator: register ``factory`` under ``name`` (unique). ``fixed``: the hyper-parameters the name itself sets
    (``"nesterov"`` is SGD with ``nesterov=True``): passing one with the same value is accepted (and dropped before the
    factory sees it), a different value is an error.

    The factory's hyper-parameters (:func:`hyperparameters`) are its keyword parameters; a factory that forwards
    ``**kwargs`` declares where they go by its return annotation (a class: its ``__init__``) or a ``forwards_to``
    attribute (any callable)."""

    def decorate(factory: OptimizerFactory) -> OptimizerFactory:
        if name in _FACTORIES:
            raise ValueError(f"optimizer {name!r} is already registered")
        _FACTORIES[name] = factory
        _FIXED[name] = dict(fixed or {})
        return factory

    return decorate


# -- hyper-parameter checking --------------------------------------------------------------------------------------

def _parameters(target: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], dict[str, Any], Any]:
    """``target``'s keyword parameters (without self / params / **kwargs), their resolved type hints ({} where the
    annotations do not resolve) and the callable its ``**kwargs`` go to (None if it has none)."""
    function = target.__init__ if inspect.isclass(target) else target
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that does not resolve: types are left to the constructor
        hints = {}
    named = {n: p for n, p in signature.parameters.items() if n not in ("self", "params")
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    forwards = None
    if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        forwards = getattr(target, "forwards_to", None) or hints.get("return")
        if not callable(forwards):
            forwards = None
    return named, {n: h for n, h in hints.items() if n in named}, forwards


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters the registered ``name`` accepts, each with its type hint (``Any`` where none), following
    ``**kwargs`` to where the factory forwards them; the ones the name fixes are listed too (a consistent value is
    accepted). Raises ``ValueError`` for an unknown name."""
    return accepted_hyperparameters(_factory(name))


@functools.cache
def accepted_hyperparameters(target: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments ``target`` accepts, with their type hints, following ``**kwargs`` to where it forwards
    them (``target.forwards_to``)."""
    accepted: dict[str, Any] = {}
    while target is not None:
        named, hints, forwards = _parameters(target)
        for n in named:
            accepted.setdefault(n, hints.get(n, Any))
        target = forwards
    return accepted


def _admits(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits the type hint ``hint``; hints this does not model admit everything (the constructor
    checks them)."""
    import torch

    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_admits(arg, value) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool) or type(value).__name__ == "bool_"
    if hint is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or (
            isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point())
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_admits(args[0], v) for v in value)
        return not args or (len(args) == len(value) and all(_admits(a, v) for a, v in zip(args, value)))
    if isinstance(hint, type) and origin is None:
        return isinstance(value, hint) or not isinstance(value, (str, bytes, numbers.Number))
    return True


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def check_hyperparameters(label: str, accepted: Mapping[str, Any], hparams: Mapping[str, Any],
                          fixed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``hparams`` checked against ``accepted`` (name → type hint) for the optimizer ``label``: an unknown name or a
    value of the wrong type is a ``ValueError`` saying what is valid; a ``fixed`` one is dropped when it agrees and an
    error when it contradicts. Returns the hyper-parameters to pass on."""
    fixed = fixed or {}
    passed = {}
    for key, value in hparams.items():
        if key in fixed:
            if value != fixed[key]:
                raise ValueError(f"Contradictory hyper-parameter for optimizer {label!r}: it fixes {key}="
                                 f"{fixed[key]!r}, got {key}={value!r}; drop the argument or choose another optimizer")
            continue
        if key not in accepted:
            valid = difflib.get_close_matches(key, list(accepted), n=len(accepted), cutoff=0.0)
            raise ValueError(f"Unknown hyper-parameter {key!r} for optimizer {label!r}. Valid hyper-parameters "
                             f"(closest first): {', '.join(valid)}")
        if not _admits(accepted[key], value):
            raise ValueError(f"Invalid {key} for optimizer {label!r}: expected {_type_name(accepted[key])}, got "
                             f"{type(value).__name__} {value!r}")
        passed[key] = value
    return passed


def _unknown(name: str) -> ValueError:
    return ValueError(f"Unknown optimizer {name!r}. Valid names: {', '.join(_FACTORIES)}")


def _factory(name: str) -> OptimizerFactory:
    if name not in _FACTORIES:
        raise _unknown(name)
    return _FACTORIES[name]


def registered_names() -> tuple[str, ...]:
    """Every registered optimizer name, in registration order."""
    return tuple(_FACTORIES)


def make_optimizer(name: Any, params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
    """Build an optimizer over ``params`` with the given hyper-parameters.

    ``name`` is a registered name (``metaopt.OPTIMIZERS``; a learned name loads its pretrained weights from
    ``checkpoints/<name>``), a checkpoint directory (``str`` or ``os.PathLike``), or a ``LearnedOptimizer`` instance
    (used frozen). ``params`` is anything ``torch.optim`` accepts: ``model.parameters()``,
    ``model.named_parameters()`` or a list of param-group dicts. Unknown names raise ``ValueError`` listing the valid
    ones; an unknown hyper-parameter name or a value of the wrong type raises ``ValueError`` listing the valid ones
    or naming the expected type (before anything is built or loaded); a hyper-parameter the name fixes is accepted
    with the same value and rejected with another; out-of-range values raise ``ValueError`` naming the argument
    (from the optimizer's constructor).
    """
    if isinstance(name, str) and name in _FACTORIES:
        factory = _FACTORIES[name]
        return factory(params, **check_hyperparameters(name, accepted_hyperparameters(factory), hparams, _FIXED[name]))
    for source in _SOURCES:
        made = source(name, params, hparams)
        if made is not None:
            return made
    if not isinstance(name, str):
        raise TypeError(f"make_optimizer expects a name, a checkpoint directory or a LearnedOptimizer, "
                        f"got {type(name).__name__}")
    raise _unknown(name)
