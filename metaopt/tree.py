"""Pytree helpers: stacking structurally identical pytrees of tensors along a new leading dimension (the instances of
a meta-batch, the seeds of a vmapped evaluation) and back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map


def stack(trees: Sequence[Any]) -> Any:
    """Stack identically structured pytrees of tensors along a new leading dimension."""
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def unstack(tree: Any, k: int) -> list[Any]:
    """Inverse of :func:`stack`: the ``k`` pytrees along the leading dimension."""
    return [tree_map(lambda x, i=i: x[i], tree) for i in range(k)]
