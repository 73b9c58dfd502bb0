"""The fast path of the frozen face of coordinatewise learned optimizers (HyperAdam, DMoptimizer, RNNprop).

The reference path (:class:`~metaopt.core.CoreOptimizer`'s ``step_group`` with ``CoordinatewiseOptimizer.update``)
concatenates every state field of a param group into one (n, k) tensor before the cell and splits it again after,
each step. Here a param group keeps its state as ONE flat (n, k) buffer per field, n being the group's coordinates
with a gradient in group order, and ``optimizer.state[p][field]`` are views into it, shaped like ``p`` plus the
trailing width: exactly what the reference path stores, so ``state_dict()`` looks the same and either path loads the
other's. A step is then one ``torch.cat`` of the gradients, one finiteness check, one call of
:func:`flat_step` (the cell, writing the new state into the buffers in place) and one ``torch._foreach_add_`` of the
update views into the parameters.

:func:`flat_step` is the whole fast step. It runs eagerly, where it is bit for bit the reference (same kernels on the
same shapes; the update is ``p + (-lr · d)``, a product rounded before the sum, as the reference computes it), or
through ``torch.compile`` (:func:`compile_flat_step`), where inductor fuses the cell, the in-place state writes and
the update into a few kernels; it is then equal to the reference within float32 rounding (fused kernels reorder
reductions and evaluate transcendental functions differently), which the tests bound.

:class:`FlatGroupState` owns one group's buffers and knows when they no longer describe ``optimizer.state``: when the
parameters with a gradient change, or a view there was replaced (``load_state_dict``, a user's assignment). The face
then rebuilds the buffers from the per-parameter state, which is what makes ``optimizer.state`` the single source of
truth and the buffers a cache of it.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.compiling import ISOLATE, compile_with_fallback


def flat_step(lopt: nn.Module, state_type: type, grad: Tensor, neg_lr: float | Tensor, update: Tensor,
              *state: Tensor) -> None:
    """One step of a coordinatewise optimizer on flat buffers, in place.

    ``grad`` (n,) is the flat gradient; ``state`` the (n, k) buffers of the fields of ``state_type`` (a NamedTuple),
    overwritten with the new state; ``update`` (n,) receives ``-lr · d``, the amount to add to the parameters
    (``neg_lr`` is ``-lr``: a Python number eagerly, which torch rounds to the buffers' dtype as the reference's
    ``-alpha * direction`` does, or a 0-d tensor of that dtype when compiled, so that changing ``lr`` needs no
    recompilation). The new state is computed completely before the first buffer is written, so a field the cell
    returns unchanged (the same tensor) is copied onto itself harmlessly.
    """
    direction, new_state = lopt.step_flat(grad, state_type(*state))
    for buffer, value in zip(state, new_state):
        buffer.copy_(value)
    torch.mul(direction, neg_lr, out=update)


FlatStepFn = Callable[..., None]

# The compiled steps of each learned optimizer (the module as key, weakly): every face of one learned optimizer shares
# its compiled step, so that a second face over parameters of a shape already met compiles nothing. An evaluation
# builds a face per seed; with a compiled step per face each of them traced the step again (measured ~1.6 s a face on
# the 2-core AMD EPYC, more than its 100 steps of MLP 784-20-10 save), while a shared one does it once per shape.
_SHARED_STEPS: weakref.WeakKeyDictionary[nn.Module, dict[bool | str, FlatStepFn]] = weakref.WeakKeyDictionary()


def compile_flat_step(mode: bool | str, lopt: nn.Module | None = None) -> FlatStepFn:
    """:func:`flat_step` through ``torch.compile(dynamic=False, fullgraph=True)``: ``mode`` True is the default mode,
    a string a torch.compile mode (``"reduce-overhead"``: CUDA graphs; ``"max-autotune"``...).

    Static shapes: one compilation per distinct n, dtype and device (and optimizer configuration); lr is an input.
    The learned optimizer's parameters are inputs too, so several instances of one configuration share a graph.
    With ``lopt`` and the default mode, the compiled step is the one every face of ``lopt`` shares (its own cache of
    graphs, with an eager fallback where compilation fails or the recompile limit is hit); otherwise each call
    compiles a new one (CUDA graphs record the addresses of one face's buffers). Raises torch's own error for an
    unknown mode."""
    if lopt is not None and mode is True:
        steps = _SHARED_STEPS.setdefault(lopt, {})
        if mode not in steps:
            compiled = torch.compile(flat_step, dynamic=False, fullgraph=True, **ISOLATE)
            # metaopt's recompile limit, not dynamo's 8: one learner meets a shape per task (hyperadam-depth: 10);
            # patching the limit costs ~50 µs a call, little beside a learned step
            steps[mode] = compile_with_fallback(compiled, flat_step, "the learned optimizer's step", detach=False)
        return steps[mode]
    # ISOLATE: each face its own cache of graphs, or a process evaluating many learners would exhaust the shared one
    return torch.compile(flat_step, dynamic=False, fullgraph=True, mode=None if mode is True else mode, **ISOLATE)


class FlatGroupState:
    """One param group's state as one flat (n, k) buffer per field, viewed by ``optimizer.state[p][field]``.

    Built by :meth:`build` from the per-parameter state (``lopt.init`` for parameters without state, as the
    reference does); checked by :meth:`matches` before every step. Also holds the flat gradient and update buffers
    and, when compiled, the 0-d ``-lr`` tensor, so a compiled step always sees the same addresses (CUDA graphs).
    """

    def __init__(self, params: list[Tensor], state_type: type, fields: list[Tensor], views: list[tuple[Tensor, ...]],
                 grad: Tensor, update: Tensor, update_views: list[Tensor]):
        self.params, self.state_type, self.fields, self.views = params, state_type, fields, views
        self.grad, self.update, self.update_views = grad, update, update_views
        self.field_names: tuple[str, ...] = state_type._fields
        self.dtype = grad.dtype
        self.lr: Any = None  # the lr that neg_lr holds (compiled steps)
        self.neg_lr: Tensor | None = None
        self.compiled = False  # whether the face steps this group through its compiled step

    @classmethod
    def build(cls, lopt: nn.Module, opt_state: dict[Tensor, dict[str, Any]], names: Sequence[str],
              params: Sequence[Tensor], grad: Tensor) -> FlatGroupState:
        """The flat state of the parameters ``params`` (named ``names``, all with a gradient; ``grad`` is their flat
        gradient, which becomes this state's gradient buffer). Copies each parameter's state from ``opt_state`` into
        the new buffers, initializing the parameters that have none with ``lopt.init``, and points
        ``opt_state[p][field]`` at views of the buffers."""
        template = lopt.init_flat(0, grad)  # the state's type and field widths
        missing = {n: p for n, p in zip(names, params) if not opt_state[p]}
        fresh = lopt.init(missing) if missing else None
        fields = []
        for field, like in zip(template._fields, template):
            width = like.shape[1]
            parts = [(getattr(fresh, field)[n] if n in missing else opt_state[p][field]).reshape(-1, width)
                     for n, p in zip(names, params)]
            fields.append(torch.cat(parts))
        sizes = [p.numel() for p in params]
        views = []
        for p, *pieces in zip(params, *(f.split(sizes) for f in fields)):
            per_field = tuple(piece.view(*p.shape, piece.shape[1]) for piece in pieces)
            opt_state[p].update(zip(template._fields, per_field))
            views.append(per_field)
        update = torch.empty_like(grad)
        update_views = [piece.view(p.shape) for p, piece in zip(params, update.split(sizes))]
        return cls(list(params), type(template), fields, views, grad, update, update_views)

    def matches(self, params: Sequence[Tensor], opt_state: dict[Tensor, dict[str, Any]]) -> bool:
        """True if these buffers are still the state of exactly ``params`` (the group's parameters with a gradient):
        the same parameters in the same order and dtype, each ``opt_state[p][field]`` still our view. Identity checks
        only, in C loops (``map``): no device work, a few microseconds for tens of tensors on the hot path."""
        if len(params) != len(self.params) or not all(map(operator.is_, params, self.params)):
            return False
        for p, views in zip(params, self.views):
            entry = opt_state.get(p)
            if (entry is None or p.dtype is not self.dtype
                    or not all(map(operator.is_, map(entry.get, self.field_names), views))):
                return False
        return True

    def release(self, opt_state: dict[Tensor, dict[str, Any]], keep: Sequence[Tensor]) -> None:
        """Before these buffers are dropped: the parameters not in ``keep`` whose state still views them get copies,
        so that their (frozen, as in the reference) state does not keep the whole old buffers alive."""
        kept = {id(p) for p in keep}
        for p, views in zip(self.params, self.views):
            entry = opt_state.get(p)
            if id(p) in kept or entry is None:
                continue
            for name, view in zip(self.field_names, views):
                if entry.get(name) is view:
                    entry[name] = view.clone()

    def mark_static(self) -> None:
        """Declare the buffers' addresses constant for torch.compile (CUDA graphs then write the state in place
        instead of refusing a graph that mutates its inputs, or copying them in and out)."""
        for t in (self.grad, self.update, *self.fields):
            torch._dynamo.mark_static_address(t)

    def neg_lr_tensor(self, lr: float | Tensor) -> Tensor:
        """``-lr`` as a 0-d tensor of the buffers' dtype and device, refilled only when ``lr`` changes."""
        if self.neg_lr is None:
            self.neg_lr = torch.zeros((), dtype=self.dtype, device=self.grad.device)
            torch._dynamo.mark_static_address(self.neg_lr)
        if isinstance(lr, Tensor) or lr != self.lr:
            self.neg_lr.fill_(-lr)
            self.lr = lr
        return self.neg_lr
