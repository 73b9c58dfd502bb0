"""The optimizer registry: one record per optimizer name (:class:`OptimizerRecord`), and ``make_optimizer``, which
builds one.

A new optimizer is one ``@register_optimizer("name", kind=..., test_hparams=..., memory=...)`` on a factory
``(params, **hparams) -> torch.optim.Optimizer`` (or on the class itself); the record is all the rest of the code
knows of it: contract tests build each record's optimizer with its ``test_hparams`` (tests/test_contract.py), and the
benchmark's roofline reads its ``memory`` (:mod:`metaopt.bench`). The registry is a leaf: it imports no
implementation; implementations register into it.

Where each capability is stated (one place each):

* what a step needs (:class:`StepNeeds`) is declared by the optimizer class, the one that defines ``step``, in two
  class attributes: ``requires_closure`` (``step(closure)``: the optimizer differentiates the training loss itself)
  and ``accepts_val_closure`` (``step`` also takes ``val_closure``, a loss on held-out data). A record names the
  class its factory builds (``builds``) and its ``needs`` is read from that class, so an optimizer built from its
  class directly (``metaopt.Marthe(...)``, no registry name) and one built by name get the same answer from
  :func:`metaopt.core.step_needs`;
* everything else in a record (kind, fixed and test hyper-parameters, memory model) is stated at its registration.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
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

# The kinds of optimizer a record can be: fixed update rules, rules that adapt their learning rate by a hypergradient,
# rules that estimate their step size without one ("parameter-free", metaopt.external) and learned rules (the names of
# pretrained checkpoints, metaopt.learned).
KINDS: tuple[str, ...] = ("classic", "hypergradient", "parameter-free", "learned")


class StepNeeds(enum.Enum):
    """What an optimizer's ``step`` needs from its caller.

    ``NOTHING``: it steps on ``p.grad`` (``step()``; a ``closure`` is optional, as in ``torch.optim``). ``CLOSURE``:
    ``step(closure)``, the closure returning the training loss with its graph (TLR-naive). ``CLOSURE_AND_VALIDATION``:
    ``step(closure, val_closure=None)``, ``val_closure`` an optional loss on held-out data (MARTHE, RTHO, HD-val)."""

    NOTHING = "nothing"
    CLOSURE = "closure"
    CLOSURE_AND_VALIDATION = "closure, optional validation closure"

    @property
    def closure(self) -> bool:
        """Whether ``step`` must be given ``closure``."""
        return self is not StepNeeds.NOTHING

    @property
    def val_closure(self) -> bool:
        """Whether ``step`` accepts ``val_closure``."""
        return self is StepNeeds.CLOSURE_AND_VALIDATION

    @classmethod
    def of(cls, optimizer_class: type) -> StepNeeds:
        """What the steps of ``optimizer_class`` need, as the class declares it (``requires_closure``,
        ``accepts_val_closure``; a class that declares neither needs nothing). The one place these declarations are
        read (module docstring)."""
        if not getattr(optimizer_class, "requires_closure", False):
            return cls.NOTHING
        if getattr(optimizer_class, "accepts_val_closure", False):
            return cls.CLOSURE_AND_VALIDATION
        return cls.CLOSURE


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """The fewest float32 values one step must move per learner coordinate, as plain data (the benchmark's
    ``ByteModel`` is built from it and says how it becomes a roofline): ``state`` floats of per-coordinate state read
    and written, ``reductions`` floats read in a pass of their own for a reduction over all coordinates that the update
    depends on (a norm, a dot product), and ``basis``, the text the benchmark prints saying what they are. A step
    moves 3 + 2·state + reductions floats per coordinate (:attr:`floats_per_coordinate`)."""

    state: float
    reductions: float
    basis: str

    @property
    def floats_per_coordinate(self) -> float:
        """Floats moved per coordinate per step: the parameter and its gradient read and the parameter written (3),
        the state read and written, the reduction pass."""
        return 3 + 2 * self.state + self.reductions


@dataclasses.dataclass(frozen=True)
class OptimizerRecord:
    """Everything the code knows of a registered optimizer (see the module docstring for where each field is stated).

    name: the registered name. factory: ``(params, **hparams) -> builds``. builds: the class the factory returns (its
    base class, where that is all the name promises), which declares what its step needs. kind: one of
    :data:`KINDS`. fixed: the hyper-parameters the name itself sets (``"nesterov"`` is SGD with ``nesterov=True``).
    test_hparams: the hyper-parameters under which the contract tests (tests/test_contract.py) run it on their
    least-squares problem. memory: its :class:`MemoryModel` at its registered defaults, None where it has none (a
    step that evaluates the loss itself; a learned rule, whose model depends on its configuration)."""

    name: str
    factory: OptimizerFactory
    builds: type
    kind: str
    fixed: Mapping[str, Any]
    test_hparams: Mapping[str, Any]
    memory: MemoryModel | None

    @property
    def needs(self) -> StepNeeds:
        """What its step needs: read from the class it builds (:meth:`StepNeeds.of`), not stated twice."""
        return StepNeeds.of(self.builds)


_RECORDS: dict[str, OptimizerRecord] = {}
# What make_optimizer asks when ``name`` is not a registered name: ``source(name, params, hparams)`` builds an
# optimizer from another kind of name (a checkpoint directory, a learned-optimizer instance: metaopt.checkpoint
# registers that one) or returns None. The registry stays a leaf: implementations register into it.
OptimizerSource = Callable[[Any, Iterable[Any], Mapping[str, Any]], "torch.optim.Optimizer | None"]
_SOURCES: list[OptimizerSource] = []


def register_source(source: OptimizerSource) -> OptimizerSource:
    """Add a builder for names that are not registered (see ``_SOURCES``); returns it (usable as a decorator)."""
    _SOURCES.append(source)
    return source


def register_optimizer(name: str, *, kind: str, test_hparams: Mapping[str, Any], builds: type | None = None,
                       memory: MemoryModel | None = None, fixed: Mapping[str, Any] | None = None
                       ) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator: record ``factory`` under ``name`` (unique) as an :class:`OptimizerRecord` with these fields.

    ``builds``: the class the factory returns; required unless the factory is that class. ``fixed``: the
    hyper-parameters the name itself sets: passing one with the same value is accepted (and dropped before the
    factory sees it), a different value is an error. Raises ``ValueError`` for a name registered twice or an unknown
    ``kind``, ``TypeError`` for a function factory without ``builds``.

    The factory's hyper-parameters (:func:`hyperparameters`) are its keyword parameters; a factory that forwards
    ``**kwargs`` declares where they go by its return annotation (a class: its ``__init__``) or a ``forwards_to``
    attribute (any callable)."""
    if kind not in KINDS:
        raise ValueError(f"Invalid kind {kind!r} for optimizer {name!r}; valid kinds: {', '.join(KINDS)}")

    def decorate(factory: OptimizerFactory) -> OptimizerFactory:
        if name in _RECORDS:
            raise ValueError(f"optimizer {name!r} is already registered")
        built = builds if builds is not None else factory
        if not inspect.isclass(built):
            raise TypeError(f"register_optimizer({name!r}): the factory {factory.__name__} is not a class; name the "
                            "class it builds (builds=)")
        _RECORDS[name] = OptimizerRecord(name=name, factory=factory, builds=built, kind=kind,
                                         fixed=types.MappingProxyType(dict(fixed or {})),
                                         test_hparams=types.MappingProxyType(dict(test_hparams)), memory=memory)
        return factory

    return decorate


def record(name: str) -> OptimizerRecord:
    """The record of the registered ``name``; ``ValueError`` listing the valid names for an unknown one."""
    if name not in _RECORDS:
        raise _unknown(name)
    return _RECORDS[name]


def records() -> tuple[OptimizerRecord, ...]:
    """Every record, in registration order."""
    return tuple(_RECORDS.values())


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
    return ValueError(f"Unknown optimizer {name!r}. Valid names: {', '.join(_RECORDS)}")


def _factory(name: str) -> OptimizerFactory:
    return record(name).factory


def registered_names() -> tuple[str, ...]:
    """Every registered optimizer name, in registration order."""
    return tuple(_RECORDS)


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
    if isinstance(name, str) and name in _RECORDS:
        entry = _RECORDS[name]
        return entry.factory(params, **check_hyperparameters(name, accepted_hyperparameters(entry.factory), hparams,
                                                             entry.fixed))
    for source in _SOURCES:
        made = source(name, params, hparams)
        if made is not None:
            return made
    if not isinstance(name, str):
        raise TypeError(f"make_optimizer expects a name, a checkpoint directory or a LearnedOptimizer, "
                        f"got {type(name).__name__}")
    raise _unknown(name)
