"""HyperAdam (Wang, Sun & Xu, AAAI 2019; ``../shared/papers/hyperadam.txt``): a learnable, task-adaptive Adam.

Per coordinate and step t (Alg. 2), with J candidate Adams:

    StateCell   ĝ_t = g_t / rms(g_t);  x_t = ELU(W_p ĝ_t + b_p) ∈ R^J;  (s_t, c_t) = LSTM(x_t, (s_{t-1}, c_{t-1}))
    AdamCell    m'_{t-1} = tanh(m_{t-1} / rms(m_{t-1}))  (per candidate, over coordinates)
                β_t = σ([m'_{t-1}, s_t] θ_u + b_u),   γ_t = σ([m'_{t-1}, s_t] θ_r + b_r)          (eqs. 4, 5)
                m_t = β_t ⊙ m_{t-1} + (1 − β_t) g_t,   v_t = γ_t ⊙ v_{t-1} + (1 − γ_t) g_t²       (lines 11, 12)
                β̂_t = β_t ⊙ β̂_{t-1} + (1 − β_t),      γ̂_t = γ_t ⊙ γ̂_{t-1} + (1 − γ_t)          (lines 13, 14; Lemma 1)
                m̂_t = (m_t / β̂_t) / sqrt(v_t / γ̂_t + ε),  ε = 1e-24                               (line 15, 16)
    WeightCell  ρ_t = ELU(s_t θ_q + b_q)                                                          (eq. 6)
    Combination d_t = Σ_j ρ_t^j m̂_t^j;   w_t = w_{t−1} − α d_t,  α = 0.005                        (eq. 7, line 18)

Choices where the paper is silent (each tested):

* Normalization: by the root-mean-square over *all* coordinates of the learner (the Euclidean norm times √n; see
  :func:`~metaopt.learned.cells.rms_normalize`). Both make the update invariant to the loss scale, as the paper
  requires; the RMS also keeps the cell's inputs O(1) on a learner 1,000× larger than the meta-training one, where
  g/‖g‖₂ would shrink every input by √1000.
* m' uses the moments *before* this step's update (m_{t-1}), as eqs. 4–5 write; m_0 = 0 gives m' = 0. It is
  squashed by tanh after the RMS normalization. The paper's m/‖m‖₂ is bounded by 1 but vanishes like 1/√n; m/rms(m)
  keeps typical entries O(1) at any size but is heavy-tailed (a coordinate whose moment is 100× the RMS is common in
  an MLP), and an input of 100 through the decay-rate layer pins γ_t at 0 for that coordinate while β_t stays near 1:
  v forgets faster than m, and the moment field m̃/√ṽ grew to 1e12–1e21 on Random-Scaling instances at a random θ
  (measured). tanh keeps the size independence and bounds every input of the decay-rate layers by 1, as the paper's
  normalization does.
* The square root of line 16 is :func:`~metaopt.numerics.safe_sqrt`, whose derivative stays finite.
* ``init="adam"`` makes it an exact Adam at the start: the weights of the β / γ / ρ layers are zero, their biases give
  constant decay rates (β_j, γ_j) and ρ = 1/J. For J = 1 the rates are ``betas``; for J > 1 they spread
  log-uniformly: 1 − β_j over [1e-2, 0.5] and 1 − γ_j over [1e-4, 0.1], around Adam's (0.9, 0.999).
  ``init="random"`` (default) keeps those biases and draws every weight like ``nn.Linear`` / ``nn.LSTMCell``, so
  that every θ receives a meta-gradient from the first step.

* ``normalize_state=True`` divides s_t by its root-mean-square over the coordinates, per candidate, before the
  decay-rate layers (θ_u, θ_r; not the WeightCell), as the authors' code does (``../shared/specs/hyperadam-official.md``):
  the LSTM's state then enters eqs. 4-5 at unit scale, like m'. Off by default, so that checkpoints written before the
  option load unchanged; the ``hyperadam-paper`` preset turns it on.

Ablations (Fig. 8): ``use_lstm=False`` makes the state the preprocessed gradient (no recurrence);
``preprocess=False`` feeds the normalized gradient to the LSTM without the FC + ELU layer.

Memory: 6J floats of state per learner coordinate (s, c, m, v, β̂, γ̂); 120 at J = 20.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaopt.learned.fused import hyperadam_step
from metaopt.learned.base import CoordinatewiseOptimizer, register_learned, register_pretrained
from metaopt.learned.cells import ACCUMULATOR_EPS, LSTMCellParams, rms_normalize
from metaopt.numerics import safe_sqrt

MOMENT_EPS = 1e-24  # ε inside the square root (Alg. 2, line 3)


class HyperAdamState(NamedTuple):
    """Per-coordinate state, each (n, J): LSTM hidden s and cell c, moments m, v, bias accumulators β̂, γ̂."""

    s: Tensor
    c: Tensor
    m: Tensor
    v: Tensor
    beta_hat: Tensor
    gamma_hat: Tensor


def _logit(p: Tensor) -> Tensor:
    return torch.log(p) - torch.log1p(-p)


@register_learned("hyperadam")
class HyperAdam(CoordinatewiseOptimizer):
    """HyperAdam with J = ``num_candidates`` candidate Adams (the paper: 20) and step size ``lr`` (α = 0.005).

    Args:
        num_candidates: J, the number of candidate updates (and the width of every layer).
        lr: the step size α.
        init: "random" (default) or "adam" (an exact Adam at the start, see the module docstring).
        betas: the decay rates of the single candidate when J = 1 with ``init="adam"``.
        use_lstm, preprocess: the paper's ablation switches.
        normalize_state: normalize s_t per candidate before the decay-rate layers (the authors' code; module docstring).
    """

    def __init__(self, num_candidates: int = 20, lr: float = 0.005, init: str = "random",
                 betas: tuple[float, float] = (0.9, 0.999), use_lstm: bool = True, preprocess: bool = True,
                 normalize_state: bool = False):
        super().__init__()
        if num_candidates < 1:
            raise ValueError(f"Invalid num_candidates: {num_candidates} (expected >= 1)")
        if init not in ("random", "adam"):
            raise ValueError(f"Invalid init: {init!r} (expected 'random' or 'adam')")
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr} (expected >= 0)")
        for i, b in enumerate(betas):
            if not 0.0 < b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b} (expected a value in (0, 1))")
        J = num_candidates
        self.num_candidates, self.lr, self.use_lstm, self.preprocess = J, lr, use_lstm, preprocess
        self.normalize_state = bool(normalize_state)
        config = dict(num_candidates=J, lr=lr, init=init, betas=list(betas), use_lstm=use_lstm, preprocess=preprocess)
        if normalize_state:  # written only when on: configs of earlier checkpoints stay what they were
            config["normalize_state"] = True
        self._store_config(**config)
        self.pre = nn.Linear(1, J) if preprocess else None        # StateCell preprocessing, FC(1 -> J) + ELU
        self.lstm = LSTMCellParams(J if preprocess else 1, J) if use_lstm else None
        state_width = J if (use_lstm or preprocess) else 1
        self.decay_beta = nn.Linear(J + state_width, J)           # θ_u, b_u (eq. 4)
        self.decay_gamma = nn.Linear(J + state_width, J)          # θ_r, b_r (eq. 5)
        self.weight = nn.Linear(state_width, J)                   # θ_q, b_q (eq. 6)
        self._init_decay_biases(betas)
        if init == "adam":
            for layer in (self.decay_beta, self.decay_gamma, self.weight):
                nn.init.zeros_(layer.weight)

    @torch.no_grad()
    def _init_decay_biases(self, betas: tuple[float, float]) -> None:
        J = self.num_candidates
        if J == 1:
            beta, gamma = torch.tensor([betas[0]]), torch.tensor([betas[1]])
        else:
            beta = 1 - torch.logspace(math.log10(1e-2), math.log10(0.5), J)
            gamma = 1 - torch.logspace(math.log10(1e-4), math.log10(0.1), J)
        self.decay_beta.bias.copy_(_logit(beta.double()))  # copy_ casts to the parameters' dtype
        self.decay_gamma.bias.copy_(_logit(gamma.double()))
        self.weight.bias.fill_(1.0 / J)  # ELU(1/J) = 1/J: the candidates start equally weighted

    @property
    def state_width(self) -> int:
        return self.weight.in_features

    kernel_name = "hyperadam"

    def kernel_width(self) -> int:
        if not (self.use_lstm and self.preprocess):
            raise ValueError(f"kernel=True: the HyperAdam kernel implements the paper's cell (use_lstm=True, "
                             f"preprocess=True), not use_lstm={self.use_lstm}, preprocess={self.preprocess}")
        return self.num_candidates

    def init_flat(self, n: int, like: Tensor) -> HyperAdamState:
        J, width = self.num_candidates, self.state_width
        zeros = like.new_zeros(n, J)
        return HyperAdamState(like.new_zeros(n, width), like.new_zeros(n, width), zeros, zeros.clone(),
                              zeros.clone(), zeros.clone())

    @property
    def has_fused_step(self) -> bool:
        return self.lstm is not None and self.pre is not None  # the ablations without them take the reference path

    def fused_step(self, grad: Tensor, state: tuple[Tensor, ...],
                   compiled: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
        if not self.has_fused_step:
            return super().fused_step(grad, state, compiled)
        return hyperadam_step(self, grad, state, MOMENT_EPS, compiled, self.normalize_state)

    def step_flat(self, grad: Tensor, state: HyperAdamState) -> tuple[Tensor, HyperAdamState]:
        g = grad.unsqueeze(-1)                                     # (n, 1)
        # StateCell
        x = rms_normalize(g)
        if self.pre is not None:
            x = F.elu(self.pre(x))
        if self.lstm is not None:
            s, c = self.lstm(x, state.s, state.c)
        else:
            s, c = x, state.c
        # AdamCell
        features = torch.cat([torch.tanh(rms_normalize(state.m)), rms_normalize(s) if self.normalize_state else s],
                             dim=-1)
        beta = torch.sigmoid(self.decay_beta(features))
        gamma = torch.sigmoid(self.decay_gamma(features))
        m = beta * state.m + (1 - beta) * g
        v = gamma * state.v + (1 - gamma) * (g * g)
        beta_hat = beta * state.beta_hat + (1 - beta)
        gamma_hat = gamma * state.gamma_hat + (1 - gamma)
        moment_field = (m / (beta_hat + ACCUMULATOR_EPS)) / safe_sqrt(v / (gamma_hat + ACCUMULATOR_EPS), MOMENT_EPS)
        # WeightCell and combination
        rho = F.elu(self.weight(s))
        direction = (rho * moment_field).sum(dim=-1)
        return direction, HyperAdamState(s, c, m, v, beta_hat, gamma_hat)


# HyperAdam meta-trained on the broad `general` family (train_meta.py --preset hyperadam-general; see its card)
register_pretrained("hyperadam-general", HyperAdam)
