"""CAM-HD's hyper-parameter validation, shared by the rule and the faces: the level names and their defaults, the
combination weights γ, the per-level β and the choice-valued options."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from metaopt.core import check_range

Scalar = float | Tensor

LEVELS = ("parameter", "unit", "layer", "global")
LEVEL_ALIASES = {"param": "parameter", "filter": "unit"}
DEFAULT_LEVELS = ("parameter", "layer", "global")
DEFAULT_GAMMA = (0.3, 0.3, 0.4)          # the paper's 3-level FFNN experiment (γ_p, γ_l, γ_g)
DEFAULT_GAMMA_2_LEVEL = (0.2, 0.8)       # the paper's 2-level experiments (γ_l or γ_filter, γ_g), A-C10
BETA_REDUCTIONS = ("sum", "mean", "paper_eq35")
BASES = ("sgd", "adam")


def parse_levels(levels: Iterable[str]) -> tuple[str, ...]:
    """Validate ``levels`` (an ordered, duplicate-free, non-empty subset of :data:`LEVELS`, fine to coarse) and
    resolve the aliases ``"param"`` and ``"filter"``. Raises ``ValueError`` naming the argument."""
    if isinstance(levels, str):
        raise ValueError(f"Invalid levels: {levels!r} (expected a sequence of level names, e.g. {DEFAULT_LEVELS})")
    resolved = tuple(LEVEL_ALIASES.get(level, level) for level in levels)
    unknown = [level for level in resolved if level not in LEVELS]
    if unknown:
        raise ValueError(f"Invalid levels: unknown level {unknown[0]!r} (expected names from {LEVELS})")
    if not resolved:
        raise ValueError("Invalid levels: at least one level is required")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"Invalid levels: {tuple(levels)!r} repeats a level")
    order = [LEVELS.index(level) for level in resolved]
    if order != sorted(order):
        raise ValueError(f"Invalid levels: {tuple(levels)!r} must be ordered fine to coarse as in {LEVELS}")
    return resolved


def default_gamma(levels: Sequence[str]) -> tuple[float, ...]:
    """The paper's initial combination weights for its two configurations, uniform weights otherwise."""
    if tuple(levels) == DEFAULT_LEVELS:
        return DEFAULT_GAMMA
    if len(levels) == 2 and levels[-1] == "global":
        return DEFAULT_GAMMA_2_LEVEL
    return tuple(1.0 / len(levels) for _ in levels)


def check_gamma(gamma: Sequence[float] | Tensor, levels: Sequence[str]) -> None:
    """γ has one weight per level; Python-number weights must be finite, ≥ 0 and sum to 1 (within 1e-6).
    Tensor γ (a learned rule's output) is only checked for its shape."""
    if isinstance(gamma, Tensor):
        if gamma.shape != (len(levels),):
            raise ValueError(f"Invalid gamma: shape {tuple(gamma.shape)} does not match the {len(levels)} levels "
                             f"{tuple(levels)}")
        return
    gamma = tuple(float(x) for x in gamma)
    if len(gamma) != len(levels):
        raise ValueError(f"Invalid gamma: {gamma!r} has {len(gamma)} weights for the {len(levels)} levels "
                         f"{tuple(levels)}")
    if not all(math.isfinite(x) and x >= 0 for x in gamma):
        raise ValueError(f"Invalid gamma: {gamma!r} (weights must be finite and >= 0)")
    if abs(sum(gamma) - 1.0) > 1e-6:
        raise ValueError(f"Invalid gamma: {gamma!r} sums to {sum(gamma)!r} (the combination weights must sum to 1)")


def _check_level_betas(hypergrad_lr: Any, levels: Sequence[str]) -> tuple[Scalar, ...]:
    """``hypergrad_lr``: one β for every level, or one per level (a Python number, or — in the functional rule — a
    tensor: a scalar, or for the unit / layer levels one β per group)."""
    if isinstance(hypergrad_lr, (int, float, Tensor)):
        betas = tuple(hypergrad_lr for _ in levels)
    else:
        betas = tuple(hypergrad_lr)
        if len(betas) != len(levels):
            raise ValueError(f"Invalid hypergrad_lr: {len(betas)} values for the {len(levels)} levels "
                             f"{tuple(levels)} (give one β, or one per level)")
    for level, beta in zip(levels, betas):
        if isinstance(beta, Tensor):
            if level in ("parameter", "global") and beta.numel() != 1:
                raise ValueError(f"Invalid hypergrad_lr: the {level} level takes a scalar β")
        else:
            check_range("hypergrad_lr", beta)
    return tuple(float(b) if isinstance(b, int) else b for b in betas)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {choices})")
