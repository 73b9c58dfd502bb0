"""CAM-HD's combination weights γ: their step (spec §6(b) step 5), shared by the rule
(:class:`~metaopt.hypergrad.cam_hd.rule.CamHDRule`) and the compiled step (:mod:`metaopt.hypergrad.cam_hd.compiled`)."""

from __future__ import annotations

import torch
from torch import Tensor

GAMMA_MODES = ("renorm", "softmax")


def update_gamma(gamma: Tensor, gamma_grad: Tensor, gamma_lr: float | Tensor, mode: str = "renorm") -> Tensor:
    """One step on the combination weights (spec §6(b) step 5; paper Alg. 1 with A-C3/A-C6).

    - ``renorm`` (Alg. 1): ``γ' = γ − δ·∂L/∂γ``; ``γ_new = max(γ', 0)/Σ max(γ', 0)``; if that sum is 0 the previous γ
      is kept.
    - ``softmax``: gradient descent on logits ``c`` with ``γ = softmax(c)``:
      ``c ← c − δ·γ ⊙ (∂L/∂γ − ⟨γ, ∂L/∂γ⟩)`` (the chain rule through the softmax), ``γ_new = softmax(c)``. The logits
      are taken as ``log γ``: softmax is shift-invariant, so this equals carrying logits in the state, and the state
      (and ``param_groups[i]["gamma"]``) holds only γ. A zero weight is a ``−inf`` logit and stays zero.

    Differentiable in all tensor arguments (the zero-sum guard uses a safe denominator, so no NaN reaches the
    gradient). Returns a new (K,) tensor.
    """
    if mode == "softmax":
        centred = gamma_grad - (gamma * gamma_grad).sum()
        return torch.softmax(torch.log(gamma) - gamma_lr * gamma * centred, dim=0)
    if mode not in GAMMA_MODES:
        raise ValueError(f"Invalid gamma_mode: {mode!r} (expected one of {GAMMA_MODES})")
    clipped = (gamma - gamma_lr * gamma_grad).clamp(min=0.0)
    total = clipped.sum()
    positive = total > 0
    return torch.where(positive, clipped / torch.where(positive, total, torch.ones_like(total)), gamma)
