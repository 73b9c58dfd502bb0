"""``torch.compile`` with an eager fallback: one definition for every compiled path of metaopt (the learned
optimizers' fused cells and steps, the hypergradient faces' ``compile=True`` steps).

Inductor needs a working C++ toolchain on a CPU (a compiler error is not a reason to stop training: the same maths
runs eagerly), and dynamo compiles once per shape family and flag combination, up to :data:`RECOMPILE_LIMIT` variants;
calls beyond it run eagerly. Either fallback warns once with the reason.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# Variants one compiled function may accumulate: a task family that mixes learners (the "general" family) meets each
# combination of coordinate count, instances per group (1 is specialised), and which cotangents are None; dynamo's
# default of 8 was hit within 12 tasks. Beyond this, calls fall back to the eager function with a warning.
RECOMPILE_LIMIT = 64

# The reasons compilation failed in this process (a C++ toolchain missing): once one is here, compiled paths run eagerly.
COMPILE_FAILED: list[str] = []

# torch.compile(isolate_recompiles=True) (recent torch) gives each compiled function its own cache of graphs: without
# it every function compiled from one code object shares one cache and its recompile limit.
ISOLATE = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


def detached(args: tuple) -> tuple:
    """``args`` with every tensor (also inside tuples and lists) detached: outside grad mode a no-op for the maths, and
    it keeps ``requires_grad`` out of the compiled graphs' guards (a meta-batch mixing tasks otherwise recompiles per
    mix of requires_grad flags and hits dynamo's recompile limit)."""
    return tuple(a.detach() if isinstance(a, Tensor) else
                 type(a)(*detached(tuple(a))) if isinstance(a, tuple) and hasattr(a, "_fields") else
                 detached(a) if isinstance(a, tuple) else
                 list(detached(tuple(a))) if isinstance(a, list) else a for a in args)


def compile_with_fallback(compiled_fn: Callable, eager_fn: Callable, what: str = "the fused cells", *,
                          detach: bool = True, recompile_limit: int | None = RECOMPILE_LIMIT) -> Callable:
    """``compiled_fn`` (a ``torch.compile`` result), running ``eager_fn`` instead where compilation failed (recorded
    in :data:`COMPILE_FAILED`) or the recompile limit is hit; ``what`` names the code in the warning.

    ``detach``: outside grad mode, call it with :func:`detached` arguments. ``recompile_limit``: dynamo's limit during
    the call (None: dynamo's own, without touching its configuration; patching it costs ~50 µs a call, which matters
    for an optimizer step of a small model)."""

    def call(args: tuple):
        if recompile_limit is None:
            return compiled_fn(*args)
        with torch._dynamo.config.patch(recompile_limit=recompile_limit):
            return compiled_fn(*args)

    def run(*args):
        if COMPILE_FAILED:
            return eager_fn(*args)
        if detach and not torch.is_grad_enabled():
            args = detached(args)
        try:
            return call(args)
        except torch._dynamo.exc.BackendCompilerFailed as err:  # inductor needs a C++ toolchain; the maths does not
            COMPILE_FAILED.append(str(err))
            warnings.warn(f"metaopt: torch.compile failed ({str(err)[:300]}); running {what} eagerly (same maths, "
                          "slower)", RuntimeWarning, stacklevel=2)
            return eager_fn(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:  # too many shapes / flags: this call runs eagerly
            warnings.warn(f"metaopt: torch.compile hit its recompile limit ({recompile_limit}); such calls of {what} "
                          "run eagerly (same maths, slower)", RuntimeWarning, stacklevel=2)
            return eager_fn(*args)

    return run


_COMPILED_STEPS: dict[tuple[Callable, bool | str], Callable] = {}


def compiled_step(fn: Callable, mode: bool | str) -> Callable:
    """The optimizer step function ``fn`` (a module-level function of tensors, updating them in place or returning
    reductions) through ``torch.compile(dynamic=False, fullgraph=True)`` in ``mode`` (True: the default mode), shared
    by every face of the process (one graph per shapes and configuration), with ``fn`` itself as the fallback
    (:func:`compile_with_fallback`). Changing scalars (rates, bias corrections) must be 0-dim tensors, or each value
    compiles anew."""
    if (fn, mode) not in _COMPILED_STEPS:
        compiled = torch.compile(fn, dynamic=False, fullgraph=True, mode=None if mode is True else mode)
        # No detaching and dynamo's own recompile limit: both cost more per call than such a step takes on a small
        # model (measured: 187 µs a call instead of 53 on the 15,910 parameters of MLP 784-20-10). Beyond the limit
        # dynamo runs the eager function (the same maths) and says so.
        _COMPILED_STEPS[fn, mode] = compile_with_fallback(compiled, fn, f"the optimizer step ({fn.__name__})",
                                                          detach=False, recompile_limit=None)
    return _COMPILED_STEPS[fn, mode]


def check_compile(compile: Any, fast: bool) -> None:
    """Validate a face's ``compile`` argument: True, False or a torch.compile mode, and only with ``fast=True``."""
    if not isinstance(compile, (bool, str)):
        raise ValueError(f"Invalid compile: {compile!r} (expected True, False or a torch.compile mode)")
    if compile is not False and not fast:
        raise ValueError(f"Invalid compile: {compile!r} (compiling needs fast=True)")
