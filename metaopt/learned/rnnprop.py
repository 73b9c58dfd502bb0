"""RNNprop (Lv, Jiang & Li, ICML 2017, "Learning Gradient Descent: Better Generalization and Longer Horizons").

DMoptimizer's coordinatewise LSTM fed Adam's statistics instead of the raw gradient: the inputs are invariant to the
scale of the loss, and the update is bounded, which is what lets it generalize to other learners and longer runs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.learned.base import CoordinatewiseOptimizer, register_learned
from metaopt.learned.cells import LSTMCellParams, deep_lstm
from metaopt.numerics import safe_sqrt

MOMENT_EPS = 1e-16  # ε inside √(v̂ + ε): Adam's 1e-8, moved under the root so safe_sqrt keeps the derivative finite


class RNNpropState(NamedTuple):
    """Per-coordinate state: the stacked LSTM's h, c (n, L·H); moments m, v and bias accumulators b̂1, b̂2 (n, 1)."""

    h: Tensor
    c: Tensor
    m: Tensor
    v: Tensor
    b1_hat: Tensor
    b2_hat: Tensor


@register_learned("rnnprop")
class RNNprop(CoordinatewiseOptimizer):
    """RNNprop: Adam-normalized inputs, FC + ELU, a ``num_layers``-layer LSTM (2 × 20), a bounded output.

    Per coordinate and step t, with g_t the coordinate's gradient and β1 = β2 = 0.95:

        m_t = β1 m_{t−1} + (1 − β1) g_t,          v_t = β2 v_{t−1} + (1 − β2) g_t²
        b̂1_t = β1 b̂1_{t−1} + (1 − β1) = 1 − β1^t,  b̂2_t = β2 b̂2_{t−1} + (1 − β2) = 1 − β2^t
        m̂_t = m_t / b̂1_t,  v̂_t = v_t / b̂2_t       (Adam's bias correction; the accumulators replace a step counter)
        x_t = (g_t / √(v̂_t + ε), m̂_t / √(v̂_t + ε)),  ε = 1e-16
        (o_t, h_{t+1}, c_{t+1}) = LSTM_2×20(ELU(W_in x_t + b_in), h_t, c_t)
        d_t = α_out · tanh(W_out o_t + b_out),  α_out = 0.1 (the paper's step bound)
        θ_{t+1} = θ_t − lr · d_t,  so |θ_{t+1} − θ_t| ≤ lr · α_out

    The paper adds α_out · tanh(·) to θ; the sign is absorbed by the learned output layer, and ``lr`` (default 1.0,
    which is the paper's optimizer) is an ordinary multiplicative step size for the frozen face and LR schedulers.

    Args:
        hidden_size: H, the width of the input layer and of every LSTM layer (20).
        num_layers: L, the number of stacked LSTM layers (2).
        lr: the step size multiplying the bounded output (1.0).
        output_bound: α_out, the largest step per coordinate at ``lr = 1`` (0.1).
        betas: the moments' decay rates (β1, β2) = (0.95, 0.95).

    Memory: 2 · L · H + 4 floats of state per learner coordinate (h, c of each layer; m, v, b̂1, b̂2): 84 at the
    defaults.
    """

    batch_agnostic = True  # no reduction over the coordinates: step_flat takes a meta-batch's instances as they are
    kernel_name = "rnnprop"

    def kernel_width(self) -> int:
        return self.hidden_size

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, lr: float = 1.0, output_bound: float = 0.1,
                 betas: tuple[float, float] = (0.95, 0.95)):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"Invalid hidden_size: {hidden_size} (expected >= 1)")
        if num_layers < 1:
            raise ValueError(f"Invalid num_layers: {num_layers} (expected >= 1)")
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr} (expected >= 0)")
        if not output_bound > 0:
            raise ValueError(f"Invalid output_bound: {output_bound} (expected > 0)")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        for i, b in enumerate(betas):
            if not 0.0 < b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b} (expected a value in (0, 1))")
        self.hidden_size, self.num_layers, self.lr = hidden_size, num_layers, lr
        self.output_bound, self.betas = output_bound, (float(betas[0]), float(betas[1]))
        self._store_config(hidden_size=hidden_size, num_layers=num_layers, lr=lr, output_bound=output_bound,
                           betas=list(self.betas))
        self.input = nn.Linear(2, hidden_size)
        self.lstm = nn.ModuleList(LSTMCellParams(hidden_size, hidden_size) for _ in range(num_layers))
        self.output = nn.Linear(hidden_size, 1)

    def init_flat(self, n: int, like: Tensor) -> RNNpropState:
        width = self.num_layers * self.hidden_size
        zeros = like.new_zeros(n, 1)
        return RNNpropState(like.new_zeros(n, width), like.new_zeros(n, width), zeros, zeros.clone(), zeros.clone(),
                            zeros.clone())

    def moments(self, grad: Tensor, state: RNNpropState) -> tuple[Tensor, RNNpropState]:
        """The LSTM's input features (g/√v̂, m̂/√v̂), (n, 2), for the flat gradient ``grad`` (n,), and the state with
        the updated moments (h, c untouched)."""
        b1, b2 = self.betas
        g = grad.unsqueeze(-1)
        m = b1 * state.m + (1 - b1) * g
        v = b2 * state.v + (1 - b2) * (g * g)
        b1_hat = b1 * state.b1_hat + (1 - b1)
        b2_hat = b2 * state.b2_hat + (1 - b2)
        root = safe_sqrt(v / b2_hat, MOMENT_EPS)
        features = torch.cat([g / root, (m / b1_hat) / root], dim=-1)
        return features, state._replace(m=m, v=v, b1_hat=b1_hat, b2_hat=b2_hat)

    def step_flat(self, grad: Tensor, state: RNNpropState) -> tuple[Tensor, RNNpropState]:
        features, state = self.moments(grad, state)
        top, h, c = deep_lstm(F.elu(self.input(features)), state.h, state.c, self.lstm)
        direction = self.output_bound * torch.tanh(self.output(top).squeeze(-1))
        return direction, state._replace(h=h, c=c)
