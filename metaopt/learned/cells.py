"""Building blocks of the coordinatewise learned optimizers, written as plain tensor maths.

Every function here is pure and works under ``torch.func.vmap`` (``nn.LSTMCell`` has no vmap batching rule, so the
LSTM cell is written out) and on a flat vector holding the coordinates of many tensors. No ``.item()``, no branching on
data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metaopt.numerics import TINY, safe_sqrt

Params = dict[str, Tensor]

# Added to HyperAdam's bias accumulators β̂, γ̂ where they divide (as the authors' code adds 1e-24 to β̂). A decay rate
# whose logit exceeds ~17 is exactly 1.0 in float32; on an instance's first step that leaves β̂ = m = 0 (or γ̂ = v = 0)
# and m / β̂ = 0/0. Measured: the checkpoints/hyperadam campaign skipped 98 of its first 950 meta-steps on exactly this,
# every one on a fresh instance's first step. With the shift the candidate's moment is 0 there; below float32's
# resolution for every β̂ ≥ 1e-17, so every other step is bit-for-bit unchanged.
ACCUMULATOR_EPS = 1e-24


def rms_normalize(x: Tensor, dim: int = 0) -> Tensor:
    """``x / rms(x)`` along ``dim``: the Euclidean normalization of HyperAdam's StateCell and AdamCell, rescaled by
    √n so that the coordinates have unit root-mean-square whatever the number n of coordinates.

    HyperAdam divides by the Euclidean norm ‖x‖₂; its coordinates then shrink like 1/√n, so an optimizer meta-trained
    on a 16k-parameter MLP would see inputs √1000 ≈ 32× smaller on a learner 1,000× larger. Dividing by
    ‖x‖₂/√n keeps the paper's scale invariance (both are homogeneous of degree 1) and makes the inputs independent of
    the learner's size. The norm is taken over all coordinates the call is given (all tensors of one learner), so the
    relative gradient magnitudes of different layers stay visible to the state.
    """
    return x / safe_sqrt((x * x).mean(dim=dim, keepdim=True), TINY)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step in PyTorch's gate order (i, f, g, o): ``x`` (..., I), ``h``, ``c`` (..., H) -> (h', c')."""
    gates = x @ weight_ih.T + h @ weight_hh.T + bias
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class LSTMCellParams(nn.Module):
    """The parameters of one LSTM cell (input size I, hidden size H), applied with :func:`lstm_cell`.

    Initialized like ``nn.LSTMCell`` (U(−1/√H, 1/√H)); a single bias vector (nn.LSTM's two biases add up).
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return lstm_cell(x, h, c, self.weight_ih, self.weight_hh, self.bias)


def deep_lstm(x: Tensor, h: Tensor, c: Tensor, cells: nn.ModuleList) -> tuple[Tensor, Tensor, Tensor]:
    """One step of a stacked LSTM, like ``nn.LSTM(num_layers=len(cells))`` on a sequence of length 1.

    ``x`` (n, I); ``h``, ``c`` (n, L·H): the L layers' hidden and cell states side by side, so that the state stays
    one (n, k) tensor per field. Returns the top layer's output (n, H) and the new ``h``, ``c`` (n, L·H).
    """
    hs, cs = h.chunk(len(cells), dim=-1), c.chunk(len(cells), dim=-1)
    new_h, new_c = [], []
    for cell, h_layer, c_layer in zip(cells, hs, cs):
        x, c_layer = cell(x, h_layer, c_layer)
        new_h.append(x)
        new_c.append(c_layer)
    return x, torch.cat(new_h, dim=-1), torch.cat(new_c, dim=-1)


def flatten(tensors: Params, names: list[str], trailing: int = 0) -> Tensor:
    """Concatenate ``tensors[n]`` for ``n`` in ``names`` along the coordinates, keeping the last ``trailing`` dims
    (a per-coordinate state of shape (*shape, J) flattens to (n, J))."""
    parts = []
    for name in names:
        t = tensors[name]
        shape = t.shape[t.dim() - trailing:] if trailing else ()
        parts.append(t.reshape(-1, *shape))
    return torch.cat(parts, dim=0)


def unflatten(flat: Tensor, like: Params, names: list[str]) -> Params:
    """Split a flat (n, *trailing) tensor back into tensors shaped like ``like[n]`` (plus the trailing dims)."""
    trailing = flat.shape[1:]
    out, start = {}, 0
    for name in names:
        shape = like[name].shape
        size = like[name].numel()
        out[name] = flat[start:start + size].reshape(*shape, *trailing)
        start += size
    return out
