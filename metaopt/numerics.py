"""Numerical helpers shared by the hand-designed and the learned rules (one definition each)."""

from __future__ import annotations

import torch
from torch import Tensor

TINY = 1e-30  # inside square roots and logarithms: keeps 0/0 and log 0 finite without touching any realistic scale


def dot64(a: Tensor, b: Tensor) -> Tensor:
    """``⟨a, b⟩`` over all elements, accumulated in float64 (a 0-dim float64 tensor; differentiable in both). Every
    hypergradient of :mod:`metaopt.hypergrad` is a sum of these, tensor by tensor, so that rules built on one another
    (HD-train and SGD-HD, CAM-HD's global level and SGD-HD) agree bit for bit."""
    return torch.dot(a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64))
