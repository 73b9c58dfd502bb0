"""DMoptimizer (Andrychowicz et al., NeurIPS 2016, "Learning to learn by gradient descent by gradient descent").

A coordinatewise deep LSTM m with parameters φ reads each coordinate's gradient and proposes its update (eqs. 1, 3):

    θ_{t+1} = θ_t + g_t,    [g_t; h_{t+1}] = m(∇_t, h_t, φ)

with one two-layer LSTM (hidden 20) shared by every coordinate and a linear output layer. Gradients enter through the
preprocessing of App. A, which maps each coordinate ∇ to a pair that is O(1) whatever the gradient's scale:

    ∇ ↦ (log|∇| / p, sgn(∇))   if |∇| ≥ e^{−p}
        (−1, e^{p} ∇)           otherwise,                 p = 10

"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from metaopt.learned.base import CoordinatewiseOptimizer, register_learned
from metaopt.learned.cells import LSTMCellParams, deep_lstm


def log_sign_preprocess(grad: Tensor, p: float = 10.0) -> Tensor:
    """The preprocessing of App. A: ``grad`` (n,) -> (n, 2), ``(log|g|/p, sgn g)`` if ``|g| ≥ e^{-p}`` else
    ``(−1, e^p g)``.

    Finite in value and derivative everywhere, g = 0 included: the logarithm only ever sees |g| where |g| ≥ e^{-p}
    (elsewhere its argument is replaced by 1), so torch.where never multiplies an infinite derivative by zero.
    """
    magnitude = grad.abs()
    large = magnitude >= math.exp(-p)
    safe_magnitude = torch.where(large, magnitude, torch.ones_like(magnitude))
    log_part = torch.where(large, torch.log(safe_magnitude) / p, torch.full_like(grad, -1.0))
    sign_part = torch.where(large, torch.sign(grad), math.exp(p) * grad)
    return torch.stack([log_part, sign_part], dim=-1)


class DMState(NamedTuple):
    """Per-coordinate state, each (n, L·H): the stacked LSTM's hidden states h and cell states c."""

    h: Tensor
    c: Tensor


@register_learned("dm")
class DMOptimizer(CoordinatewiseOptimizer):
    """DMoptimizer: a coordinatewise ``num_layers``-layer LSTM (the paper: 2 × 20) with a linear output layer.

    Per coordinate and step t, with ∇_t the coordinate's gradient:

        x_t = preprocess(∇_t) ∈ R²  (App. A, p = 10; or x_t = ∇_t with ``preprocess=False``)
        (o_t, h_{t+1}, c_{t+1}) = LSTM_2×20(x_t, h_t, c_t),    out_t = W o_t + b
        d_t = output_scale · out_t,    θ_{t+1} = θ_t − lr · d_t

    The paper's step g_t is −lr · output_scale · out_t. Writing it as a descent step w ← w − α d (the convention of
    every :class:`CoordinatewiseOptimizer`) only flips the sign of the output layer, which is learned; it lets ``lr``
    act as an ordinary multiplicative step size (the frozen face's ``lr``, LR schedulers). The 0.1 output scale keeps
    the first, untrained steps small; ``lr = 1`` reproduces the network's own step.

    Args:
        hidden_size: H, the width of every LSTM layer (20).
        num_layers: L, the number of stacked LSTM layers (2).
        lr: the step size α multiplying the scaled output (1.0).
        output_scale: the fixed factor on the output layer (0.1).
        p: the preprocessing constant of App. A (10).
        preprocess: ``False`` feeds the raw gradient to the LSTM (input size 1) instead of the (log, sign) pair.

    Memory: 2 · L · H floats of state per learner coordinate (h, c of each layer): 80 at the defaults.
    """

    batch_agnostic = True  # no reduction over the coordinates: step_flat takes a meta-batch's instances as they are
    kernel_name = "dm"

    def kernel_width(self) -> int:
        return self.hidden_size

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, lr: float = 1.0, output_scale: float = 0.1,
                 p: float = 10.0, preprocess: bool = True):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"Invalid hidden_size: {hidden_size} (expected >= 1)")
        if num_layers < 1:
            raise ValueError(f"Invalid num_layers: {num_layers} (expected >= 1)")
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr} (expected >= 0)")
        if not output_scale > 0:
            raise ValueError(f"Invalid output_scale: {output_scale} (expected > 0)")
        if not p > 0:
            raise ValueError(f"Invalid p: {p} (expected > 0)")
        self.hidden_size, self.num_layers, self.lr = hidden_size, num_layers, lr
        self.output_scale, self.p, self.preprocess = output_scale, p, preprocess
        self._store_config(hidden_size=hidden_size, num_layers=num_layers, lr=lr, output_scale=output_scale, p=p,
                           preprocess=preprocess)
        input_size = 2 if preprocess else 1
        self.lstm = nn.ModuleList(LSTMCellParams(input_size if i == 0 else hidden_size, hidden_size)
                                  for i in range(num_layers))
        self.output = nn.Linear(hidden_size, 1)

    def init_flat(self, n: int, like: Tensor) -> DMState:
        width = self.num_layers * self.hidden_size
        return DMState(like.new_zeros(n, width), like.new_zeros(n, width))

    def inputs(self, grad: Tensor) -> Tensor:
        """The LSTM's input for the flat gradient ``grad`` (n,): (n, 2) preprocessed, or (n, 1) raw."""
        return log_sign_preprocess(grad, self.p) if self.preprocess else grad.unsqueeze(-1)

    def step_flat(self, grad: Tensor, state: DMState) -> tuple[Tensor, DMState]:
        top, h, c = deep_lstm(self.inputs(grad), state.h, state.c, self.lstm)
        direction = self.output_scale * self.output(top).squeeze(-1)
        return direction, DMState(h, c)
