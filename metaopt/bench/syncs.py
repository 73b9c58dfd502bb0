"""Counting host reads: the points where Python reads a tensor's value (``item()``, ``bool()``, ``float()``,
``int()``, ``tolist()``, ``numpy()``, ``__index__``), each a host synchronisation on a GPU (the host waits for the
device's queue) and a break in any captured or compiled region.

:class:`HostReads` is a ``TorchFunctionMode``, so it sees every read made through a tensor's Python methods on any
device, CPU included; reads inside C++ (``torch.compile``'d code, a kernel's own launch logic) are not Python calls and
are not counted. ``tests/test_syncs.py`` holds each optimizer's step to its measured count.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from torch.overrides import TorchFunctionMode

READS = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"})


class HostReads(TorchFunctionMode):
    """Context manager: ``counts`` (a ``Counter`` by method name) and ``total`` of the host reads made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def host_reads(fn: Callable[[], Any]) -> int:
    """How many host reads one call of ``fn`` makes."""
    with HostReads() as reads:
        fn()
    return reads.total
