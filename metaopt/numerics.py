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


class _SafeSqrt(torch.autograd.Function):
    """sqrt(x + eps) whose derivative is 0 where x == 0 exactly (a coordinate that never had a gradient), instead of
    1 / (2 sqrt(eps)). That derivative is finite but can reach ~5e11 for eps = 1e-24 and, multiplied through an
    unroll, overflows float32 into inf/NaN meta-gradients (the failure reported in higher #125 and torchopt #26)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, eps: float) -> Tensor:
        return torch.sqrt(x + eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, _ = inputs
        ctx.save_for_backward(x, output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, root = ctx.saved_tensors
        return torch.where(x > 0, grad / (2 * root), torch.zeros_like(grad)), None


def safe_sqrt(x: Tensor, eps: float = 0.0) -> Tensor:
    """``sqrt(x + eps)`` with a finite, zero-at-zero derivative (see :class:`_SafeSqrt`). ``x`` must be ≥ 0. The one
    safe square root of the learned rules: HyperAdam's normalizations (``eps`` = TINY), RNNprop's moments, the learned
    γ's cosine feature (``eps`` = 0)."""
    return _SafeSqrt.apply(x, eps)


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, 0 where den = 0, with a finite derivative everywhere (no 0/0 in the graph)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))
