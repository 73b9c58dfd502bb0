"""The functional optimizer protocol and the ``torch.optim`` face that every metaopt optimizer shares.

An update rule is a :class:`FunctionalOptimizer`: a pure pair of functions over dicts of tensors (optax-style, but
returning the new parameters rather than an additive update, so that the last operation can be torch's own fused
``torch.add(p, d, alpha=-lr)`` and match ``torch.optim`` bit for bit)::

    state = rule.init(params)                                  # params: dict[str, Tensor]
    new_params, state = rule.step(params, grads, state)        # out of place, differentiable

Rules never modify their inputs, so they can be differentiated through (meta-training) and called under
``torch.func`` transforms. Hyper-parameters that are Python numbers keep torch's exact arithmetic; tensor-valued ones
(for example a learned CAM-HD gamma) flow through autograd.

:class:`CoreOptimizer` is the ``torch.optim.Optimizer`` face over a rule. It owns no maths: each ``step()`` gathers a
parameter group into dicts, calls the rule under ``no_grad`` and copies the new values back. It also owns what every
optimizer must do the same way: skipping (and counting) steps whose gradients are not finite, and storing the rule's
state so that ``state_dict()`` / ``load_state_dict()`` resume exactly.

State layout. A rule's state is a NamedTuple. A field whose value is a ``dict`` keyed by parameter name is
*per-parameter* and lives in ``optimizer.state[p][field]``; any other field (a Python number, or a 0-/1-d tensor
such as a global learning rate, a step counter or CAM-HD's gamma) is *group-level* and lives in
``param_group[field]`` as a Python float / int / list, so it is visible to users and LR schedulers and travels in
``state_dict()``. A group-level field that shares its name with a hyper-parameter (``lr``) is read back from the group
before every step, which is how schedulers and users change it.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from metaopt.registry import StepNeeds

Params = dict[str, Tensor]

NONFINITE_MODES = ("skip", "raise")


class FunctionalOptimizer(abc.ABC):
    """A pure update rule with fixed hyper-parameters.

    Subclasses implement :meth:`init` and :meth:`step`; both must be free of side effects on their arguments.
    """

    @abc.abstractmethod
    def init(self, params: Params) -> NamedTuple:
        """The state before the first step, for ``params`` (a dict of tensors)."""

    @abc.abstractmethod
    def step(self, params: Params, grads: Params, state: NamedTuple) -> tuple[Params, NamedTuple]:
        """One update: returns the new parameters and the new state (new tensors; inputs untouched)."""


def check_range(name: str, value: float, low: float = 0.0, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError("Invalid <name>: ...")`` unless ``value`` lies in the interval (torch.optim style)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return  # tensor-valued hyper-parameters (learned rules) are checked by their producer
        value = float(value)
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high and not math.isnan(value)):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {value!r} (expected a value in {left}{low}, {high}{right})")


def check_betas(betas: tuple[float, float]) -> None:
    """torch's checks: each beta in [0, 1)."""
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (expected a value in [0, 1))")


def _tensors_in(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, tuple):
        return [t for v in value for t in _tensors_in(v)]
    return []


def to_group_values(values: Sequence[Any]) -> list[Any]:
    """Group-level state as plain Python values, so param_groups stay readable: each of ``values`` with its tensors
    as ``item()`` / ``tolist()`` would give them and its tuples as lists (anything else kept), with one host read per
    device instead of one per tensor: the tensors are flattened into one float64 vector, read once, and cut back
    into each tensor's ``item()`` / ``tolist()``. Exact: float32 and float16 values are float64 values, integer and
    boolean tensors come back as ``int`` / ``bool`` (counters stay far below 2**53)."""
    tensors = [t for v in values for t in _tensors_in(v)]
    read: dict[int, list[float]] = {}
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for group in by_device.values():
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in group]).tolist()
        start = 0
        for t in group:
            read[id(t)] = flat[start:start + t.numel()]
            start += t.numel()

    def rebuild(value: Any) -> Any:
        if isinstance(value, tuple):
            return [rebuild(v) for v in value]
        if not isinstance(value, Tensor):
            return value
        if value.numel() == 0:
            return value.tolist()
        kind = float if value.is_floating_point() else bool if value.dtype == torch.bool else int
        items = [kind(x) for x in read[id(value)]]
        if value.dim() == 0:
            return items[0]
        for size in reversed(value.shape[1:]):
            items = [items[i:i + size] for i in range(0, len(items), size)]
        return items

    return [rebuild(v) for v in values]


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one host synchronization.

    The tensors' sums come first (one vectorized pass each, ~25x faster on a CPU than ``isfinite`` and its boolean
    copy): a NaN or an inf anywhere makes a sum NaN or infinite, so finite sums settle it. A sum that overflowed from
    finite values (a float16 gradient summing past 65504) is told apart by the exact element check."""
    sums = [t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum() for t in tensors]
    # Their total, a NaN or inf if any sum is (or, rarely, where finite sums overflow: the exact check settles it):
    # one reduction of a few numbers and a scalar read, cheaper than isfinite().all() on the stacked sums.
    if math.isfinite((sums[0] if len(sums) == 1 else torch.stack(sums).sum()).item()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def step_needs(optimizer: torch.optim.Optimizer) -> tuple[bool, bool]:
    """What ``optimizer.step`` needs, as its class declares it: ``(closure, val_closure)``. ``closure``: the
    optimizer differentiates the training loss itself (``step(closure)``: MARTHE, RTHO, HD-val, TLR-naive);
    ``val_closure``: its ``step`` also takes ``val_closure``, a loss on held-out data (MARTHE's family). Other
    optimizers step on ``p.grad`` (``step()``). Read by :meth:`metaopt.registry.StepNeeds.of` from the class, the
    single source a registry record's ``needs`` is read from too, so an optimizer built from its class directly
    answers as one built by name."""
    needs = StepNeeds.of(type(optimizer))
    return needs.closure, needs.val_closure


class NonfiniteGuard:
    """What a face does with a non-finite gradient or rate (``self.nonfinite``: ``"skip"`` or ``"raise"``; the class
    sets ``self.nonfinite`` and ``self._warned_nonfinite = False`` in its ``__init__``). Shared by
    :class:`CoreOptimizer` and the package-backed faces of :mod:`metaopt.external`."""

    nonfinite: str
    _warned_nonfinite: bool

    def check_finite(self, group: dict[str, Any], tensors: Iterable[Tensor]) -> bool:
        """True if every tensor is finite; otherwise count/warn (``skip``) or raise (``raise``)."""
        tensors = list(tensors)
        if not tensors:
            return True
        return all_finite(tensors) or self.skip_nonfinite(group, "gradient (NaN or inf)")

    def skip_nonfinite(self, group: dict[str, Any], what: str, error: Exception | None = None) -> bool:
        """Refuse a group's step because ``what`` is not finite: raise (``nonfinite="raise"``; ``error`` if given),
        or count it in ``group["nonfinite_skipped"]`` and warn once. The caller must not have written anything yet.
        Returns False (the step was skipped)."""
        if self.nonfinite == "raise":
            raise error or FloatingPointError(
                f"{type(self).__name__}: non-finite {what}; the step was not applied. Lower the learning rate, clip "
                "gradients, or pass nonfinite='skip' to skip such steps.")
        group["nonfinite_skipped"] = group.get("nonfinite_skipped", 0) + 1
        if not self._warned_nonfinite:
            warnings.warn(
                f"{type(self).__name__}: skipped a step with a non-finite {what}; parameters and optimizer state are "
                "unchanged. Further skips are counted in param_groups[i]['nonfinite_skipped'].",
                RuntimeWarning, stacklevel=4)
            self._warned_nonfinite = True
        return False


class CoreOptimizer(NonfiniteGuard, torch.optim.Optimizer):
    """``torch.optim.Optimizer`` face over a :class:`FunctionalOptimizer`.

    Subclasses implement :meth:`rule`, which builds the functional rule from one parameter group's
    hyper-parameters, and validate those hyper-parameters in their ``__init__``.

    Args:
        params: parameters, ``named_parameters()`` or param-group dicts, as for any ``torch.optim`` optimizer.
            Named parameters give the rule meaningful keys (CAM-HD groups layers by module name).
        defaults: the hyper-parameters' defaults.
        nonfinite: ``"skip"`` (default) skips a group's step when any of its gradients is NaN or infinite,
            counts it in ``param_group["nonfinite_skipped"]`` and warns once; ``"raise"`` raises
            ``FloatingPointError`` instead. Either way nothing non-finite reaches the parameters or the state.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, nonfinite: str = "skip"):
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (expected one of {NONFINITE_MODES})")
        self.nonfinite = nonfinite
        self._warned_nonfinite = False
        self._layouts: dict[int, tuple[type, list[tuple[str, bool, Any]]]] = {}  # id(group) -> the rule's state layout
        super().__init__(params, dict(defaults, nonfinite_skipped=0))

    # -- what subclasses provide ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def rule(self, group: dict[str, Any]) -> FunctionalOptimizer:
        """The functional rule for one param group, built from the group's current hyper-parameters."""

    # -- the step ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.step_group(group)
        return loss

    def step_group(self, group: dict[str, Any], grads: Params | None = None) -> bool:
        """Apply the rule to one group; ``grads`` defaults to ``p.grad``. Returns False if the step was skipped."""
        gathered = self.gather(group, grads)
        if gathered is None:
            return False
        names, params, grads = gathered
        live = [(n, p) for n, p in zip(names, params) if n in grads]
        param_dict = {n: p for n, p in live}
        rule = self.rule(group)
        state = self.load_rule_state(group, rule, param_dict)
        new_params, new_state = rule.step(param_dict, grads, state)
        for n, p in live:
            p.copy_(new_params[n])
        self.store_rule_state(group, param_dict, new_state)
        return True

    # -- helpers shared by faces with their own step() (MARTHE, TLR-naive, CAM-HD) -----------------------------------

    def gather(self, group: dict[str, Any], grads: Params | None = None, *, check: bool = True
               ) -> tuple[list[str], list[Tensor], Params] | None:
        """A group's names, parameters and gradients (``p.grad`` unless given; parameters without one are left out),
        or None when there is nothing to apply: no gradient at all, or a non-finite one (counted / raised; with
        ``check=False`` the caller screens the gradients itself)."""
        names, params = self.named_params(group)
        if grads is None:
            grads = {n: p.grad for n, p in zip(names, params) if p.grad is not None}
        if not grads:
            return None
        for n, g in grads.items():
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter {n!r})")
        if check and not self.check_finite(group, grads.values()):
            return None
        return names, params, grads

    @staticmethod
    def named_params(group: dict[str, Any]) -> tuple[list[str], list[Tensor]]:
        """The group's parameters and their names (``param_names`` when given, else their index in the group)."""
        params = list(group["params"])
        names = group.get("param_names") or [str(i) for i in range(len(params))]
        return list(names), params

    def load_rule_state(self, group: dict[str, Any], rule: FunctionalOptimizer, params: Params) -> NamedTuple:
        """Rebuild the rule's NamedTuple state from ``self.state`` and the group (``rule.init`` where missing).

        ``rule.init`` runs only when some parameter has no state yet (or the group's state layout is not known): on
        the hot path the state is reassembled from what the last step stored, without allocating a fresh one."""
        missing = {n: p for n, p in params.items() if not self.state[p]}
        layout = self._layouts.get(id(group))
        fresh = None
        if missing or layout is None:
            fresh = rule.init(missing if missing else params)
            layout = (type(fresh), [(f, isinstance(v, dict), None if isinstance(v, dict) else v)
                                    for f, v in zip(fresh._fields, fresh)])
            self._layouts[id(group)] = layout
        state_type, fields = layout
        values = {}
        for field, per_parameter, like in fields:
            if per_parameter:
                values[field] = {n: (getattr(fresh, field)[n] if n in missing else self.state[p][field])
                                 for n, p in params.items()}
            elif field in group:  # stored by an earlier step, or a hyper-parameter such as lr
                values[field] = self._from_group_value(group[field], like)
            else:
                values[field] = getattr(fresh, field) if fresh is not None else like
        return state_type(**values)

    def store_rule_state(self, group: dict[str, Any], params: Params, state: NamedTuple) -> None:
        """Write a rule's state back: per-parameter fields to ``self.state``, the rest into the group."""
        group_fields = []
        for field, value in zip(state._fields, state):
            if isinstance(value, dict):
                for n, p in params.items():
                    self.state[p][field] = value[n]
            else:
                group_fields.append((field, value))
        for (field, _), value in zip(group_fields, to_group_values([v for _, v in group_fields])):
            group[field] = value

    @staticmethod
    def _from_group_value(stored: Any, like: Any) -> Any:
        """Group values go back to the rule in the type ``init`` uses (a tensor stays a tensor)."""
        if isinstance(like, Tensor):
            return torch.as_tensor(stored, dtype=like.dtype, device=like.device)
        if isinstance(like, tuple):
            return tuple(stored)
        return stored
