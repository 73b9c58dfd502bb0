"""Fused Triton kernels for the frozen step of the coordinatewise learned optimizers (HyperAdam, DMoptimizer,
RNNprop): ``frozen(params, kernel=True)``.

Why. A frozen step is bound by memory: HyperAdam (J = 20) reads and writes 6J = 120 floats of state per coordinate,
and the roofline of ResNet-18's 11.2 M parameters is ~3.6 ms on an H100. The eager flat path
(:mod:`metaopt.learned.fast`) runs the cell as some fifty PyTorch kernels, each reading and writing (n, J) tensors;
inductor fuses the elementwise ones but keeps the (n, J) x (J, 4J) products as separate matrix multiplications whose
outputs go through memory. Here one program owns a block of coordinates (rows) and does everything for them in
registers: it loads each state field once, runs the LSTM gates, the decay-rate and weight layers as small
``tl.dot`` products against the cell's weights (a few KB, served from L1/L2), and stores each field once. What is
left outside the kernel are the reductions over all coordinates that the cell's normalizations need before any row
can be computed (HyperAdam: the RMS of g, and of each column of m, which costs one extra read of m; DM and RNNprop
have none).

Equal to the reference :meth:`~metaopt.learned.base.CoordinatewiseOptimizer.step_flat` within float32 rounding,
not bit for bit: products are summed in another order, and tanh / ELU are written with exp (tanh x = 2σ(2x) − 1,
absolute error ~1e-7). ``tl.dot`` runs with ``input_precision="ieee"``: TF32 would change the results by ~1e-3,
beyond what the tests accept. Tests: ``tests/test_learned_kernels.py`` against the reference on CPU under Triton's
interpreter, and the benchmark (``python -m metaopt.bench``, variant ``triton``) on the GPU, which stops on a
mismatch.

Where it runs. On CUDA tensors, compiled by Triton (block size and warps autotuned per number of coordinates, the
state restored after each trial). Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is first imported;
the test suite sets it on machines without CUDA) runs the same kernels on CPU tensors, slowly: it is for tests, and the
CPU's fast path is ``fast=True`` without ``kernel``. Supported: float32 state; HyperAdam with its LSTM and
preprocessing (the paper's cell, any J ≤ 64); DMoptimizer and RNNprop with any number of layers and hidden sizes
≤ 64. Anything else is refused by :func:`check_supported` with the reason.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.numerics import TINY

try:
    import triton
    import triton.language as tl
except ImportError as _error:  # e.g. torch's aarch64 CPU wheels come without triton
    triton = tl = None
    _TRITON_MISSING = str(_error)

MAX_WIDTH = 64  # the largest J / hidden size the kernels take: their tiles are (BLOCK, next power of 2 ≥ 16)
INTERPRET_BLOCK = 64  # rows per program under the interpreter (no autotuning there; fewer programs run faster)


def interpreting() -> bool:
    """True if Triton runs kernels in its interpreter (on CPU tensors), i.e. ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_supported(lopt: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` naming the reason if the kernels cannot step ``lopt`` (a coordinatewise learned optimizer,
    whose ``kernel_name`` / ``kernel_width()`` declare its kernel) on ``device`` in ``dtype``."""
    name = type(lopt).__name__
    width = lopt.kernel_width()
    if width > MAX_WIDTH:
        raise ValueError(f"kernel=True: {name}'s width {width} exceeds the kernels' {MAX_WIDTH}")
    if dtype != torch.float32:
        raise ValueError(f"kernel=True: the kernels take float32 parameters, got {dtype}; use fast=True without "
                         "kernel")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"kernel=True: the Triton kernels run on CUDA tensors (got {device.type}); on a CPU use "
                         "fast=True without kernel (tests run the kernels on the CPU under TRITON_INTERPRET=1)")
    if triton is None:
        raise ValueError(f"kernel=True needs the triton package ({_TRITON_MISSING}); use fast=True without kernel")
    if (device.type == "cuda") == _INTERPRETED:
        raise ValueError("kernel=True: this process imported metaopt.learned.kernels with TRITON_INTERPRET="
                         f"{os.environ.get('TRITON_INTERPRET')!r}, which decides once per process whether Triton "
                         f"compiles (CUDA tensors) or interprets (CPU tensors); got {device.type} tensors")


# ----------------------------------------------------------------------------------------------------------------------
# The kernels

# The state fields each kernel overwrites, restored after each autotuning trial (a trial is a real step).
_STATE_ARGS = {"hyperadam": ["s_ptr", "c_ptr", "m_ptr", "v_ptr", "bh_ptr", "gh_ptr"],
               "dm": ["h_ptr", "c_ptr"],
               "rnnprop": ["h_ptr", "c_ptr", "m_ptr", "v_ptr", "b1h_ptr", "b2h_ptr"]}
# Triton decides when a kernel is decorated, from TRITON_INTERPRET, whether it is compiled or interpreted; the
# helpers of triton.language (tl.sigmoid, ...) were decorated when triton was first imported, so the variable must be
# set before that (tests/conftest.py does on machines without CUDA).
_INTERPRETED = interpreting()

if triton is not None:
    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _elu(x):
        return tl.where(x > 0, x, tl.exp(tl.minimum(x, 0.0)) - 1.0)  # the minimum keeps the unused branch finite

    @triton.jit
    def _load_cols(ptr, rows, n, ld, col0, width, WP: tl.constexpr):
        """(BLOCK, WP) tile, zero padded, of columns col0 .. col0 + width of the (n, ld) row-major array."""
        cols = tl.arange(0, WP)
        mask = (rows[:, None] < n) & (cols[None, :] < width)
        return tl.load(ptr + rows[:, None] * ld + col0 + cols[None, :], mask=mask, other=0.0)

    @triton.jit
    def _store_cols(ptr, value, rows, n, ld, col0, width, WP: tl.constexpr):
        cols = tl.arange(0, WP)
        mask = (rows[:, None] < n) & (cols[None, :] < width)
        tl.store(ptr + rows[:, None] * ld + col0 + cols[None, :], value, mask=mask)

    @triton.jit
    def _vector(ptr, offset, stride, size, P: tl.constexpr, other):
        """ptr[offset + j·stride] for j < size as a (P,) vector, padded with ``other``."""
        j = tl.arange(0, P)
        return tl.load(ptr + offset + j * stride, mask=j < size, other=other)

    @triton.jit
    def _times_weight_t(x, ptr, row0, ld, col0, out_size, in_size, OUTP: tl.constexpr, INP: tl.constexpr):
        """x (BLOCK, INP) @ W[row0 : row0 + out_size, col0 : col0 + in_size]ᵀ -> (BLOCK, OUTP), W row-major with
        ``ld`` columns (nn.Linear's x Wᵀ on a block of W); the padding of the weight tile is 0."""
        k = tl.arange(0, INP)
        j = tl.arange(0, OUTP)
        mask = (k[:, None] < in_size) & (j[None, :] < out_size)
        w = tl.load(ptr + (row0 + j[None, :]) * ld + col0 + k[:, None], mask=mask, other=0.0)
        return tl.dot(x, w, input_precision="ieee")

    @triton.jit
    def _gate(x, h, w_ih, w_hh, bias, q, in_size, H, INP: tl.constexpr, HP: tl.constexpr):
        """Pre-activation of LSTM gate q (0..3 = i, f, g, o): x W_ih[qH:(q+1)H]ᵀ + h W_hh[qH:(q+1)H]ᵀ + b."""
        return (_times_weight_t(x, w_ih, q * H, in_size, 0, H, in_size, HP, INP)
                + _times_weight_t(h, w_hh, q * H, H, 0, H, H, HP, HP)
                + _vector(bias, q * H, 1, H, HP, 0.0)[None, :])

    @triton.jit
    def _lstm(x, h, c, w_ih, w_hh, bias, in_size, H, INP: tl.constexpr, HP: tl.constexpr):
        """One LSTM step in PyTorch's gate order (cells.lstm_cell): x (BLOCK, INP), h, c (BLOCK, HP). Padded
        columns stay 0: their weights are 0, so c' = σ(0)·0 + σ(0)·tanh(0) = 0 and h' = σ(0)·tanh(0) = 0."""
        i = _gate(x, h, w_ih, w_hh, bias, 0, in_size, H, INP, HP)
        f = _gate(x, h, w_ih, w_hh, bias, 1, in_size, H, INP, HP)
        g = _gate(x, h, w_ih, w_hh, bias, 2, in_size, H, INP, HP)
        o = _gate(x, h, w_ih, w_hh, bias, 3, in_size, H, INP, HP)
        c = tl.sigmoid(f) * c + tl.sigmoid(i) * _tanh(g)
        return tl.sigmoid(o) * _tanh(c), c

    @triton.jit
    def _deep_lstm(x, h_ptr, c_ptr, rows, n, w_ih, w_hh, bias, H, L: tl.constexpr, HP: tl.constexpr):
        """Layers 1 .. L-1 of a stacked LSTM (cells.deep_lstm) on x (BLOCK, HP), the output of layer 0; layer l's
        h, c are columns lH .. (l+1)H of the (n, L·H) state, read and written here; its weights are the l-th of
        ``w_ih`` (L-1, 4H, H), ``w_hh`` (L, 4H, H), ``bias`` (L, 4H). Returns the top layer's output."""
        for layer in tl.static_range(1, L):
            h = _load_cols(h_ptr, rows, n, L * H, layer * H, H, HP)
            c = _load_cols(c_ptr, rows, n, L * H, layer * H, H, HP)
            x, c = _lstm(x, h, c, w_ih + (layer - 1) * 4 * H * H, w_hh + layer * 4 * H * H, bias + layer * 4 * H,
                         H, H, HP, HP)
            _store_cols(h_ptr, x, rows, n, L * H, layer * H, H, HP)
            _store_cols(c_ptr, c, rows, n, L * H, layer * H, H, HP)
        return x

    @triton.jit
    def hyperadam_kernel(grad_ptr, s_ptr, c_ptr, m_ptr, v_ptr, bh_ptr, gh_ptr, update_ptr, rms_g_ptr, rms_m_ptr,
                         pre_w, pre_b, w_ih, w_hh, lstm_b, beta_w, beta_b, gamma_w, gamma_b, rho_w, rho_b,
                         neg_lr, n, J, JP: tl.constexpr, BLOCK: tl.constexpr):
        """HyperAdam.step_flat on rows pid·BLOCK ... (n, J state fields, each read and overwritten once);
        ``update`` receives −lr·d. ``rms_g`` (1,) and ``rms_m`` (J,) are the normalizers over all coordinates."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, JP)
        g = tl.load(grad_ptr + rows, mask=rows < n, other=0.0)[:, None]                     # (BLOCK, 1)
        # StateCell: x = ELU(W_p (g / rms g) + b_p); (s, c) = LSTM(x, (s, c))
        g_hat = g / tl.load(rms_g_ptr)
        x = _elu(g_hat * _vector(pre_w, 0, 1, J, JP, 0.0)[None, :] + _vector(pre_b, 0, 1, J, JP, 0.0)[None, :])
        x = tl.where(cols[None, :] < J, x, 0.0)
        s, c = _lstm(x, _load_cols(s_ptr, rows, n, J, 0, J, JP), _load_cols(c_ptr, rows, n, J, 0, J, JP),
                     w_ih, w_hh, lstm_b, J, J, JP, JP)
        # AdamCell (eqs. 4, 5; Alg. 2 lines 11-16) on the features [tanh(m / rms m), s]
        m = _load_cols(m_ptr, rows, n, J, 0, J, JP)
        m_feature = _tanh(m / _vector(rms_m_ptr, 0, 1, J, JP, 1.0)[None, :])
        beta = tl.sigmoid(_times_weight_t(m_feature, beta_w, 0, 2 * J, 0, J, J, JP, JP)
                          + _times_weight_t(s, beta_w, 0, 2 * J, J, J, J, JP, JP)
                          + _vector(beta_b, 0, 1, J, JP, 0.0)[None, :])
        gamma = tl.sigmoid(_times_weight_t(m_feature, gamma_w, 0, 2 * J, 0, J, J, JP, JP)
                           + _times_weight_t(s, gamma_w, 0, 2 * J, J, J, J, JP, JP)
                           + _vector(gamma_b, 0, 1, J, JP, 0.0)[None, :])
        m = beta * m + (1.0 - beta) * g
        v = gamma * _load_cols(v_ptr, rows, n, J, 0, J, JP) + (1.0 - gamma) * (g * g)
        beta_hat = beta * _load_cols(bh_ptr, rows, n, J, 0, J, JP) + (1.0 - beta)
        gamma_hat = gamma * _load_cols(gh_ptr, rows, n, J, 0, J, JP) + (1.0 - gamma)
        field = (m / (beta_hat + 1e-24)) / tl.sqrt(v / (gamma_hat + 1e-24) + 1e-24)  # cells.ACCUMULATOR_EPS
        # WeightCell and the combination (eqs. 6, 7)
        rho = _elu(_times_weight_t(s, rho_w, 0, J, 0, J, J, JP, JP) + _vector(rho_b, 0, 1, J, JP, 0.0)[None, :])
        direction = tl.sum(tl.where(cols[None, :] < J, rho * field, 0.0), axis=1)
        _store_cols(s_ptr, s, rows, n, J, 0, J, JP)
        _store_cols(c_ptr, c, rows, n, J, 0, J, JP)
        _store_cols(m_ptr, m, rows, n, J, 0, J, JP)
        _store_cols(v_ptr, v, rows, n, J, 0, J, JP)
        _store_cols(bh_ptr, beta_hat, rows, n, J, 0, J, JP)
        _store_cols(gh_ptr, gamma_hat, rows, n, J, 0, J, JP)
        tl.store(update_ptr + rows, neg_lr * direction, mask=rows < n)

    @triton.jit
    def dm_kernel(grad_ptr, h_ptr, c_ptr, update_ptr, w_ih0, w_ih, w_hh, lstm_b, out_w, out_b,
                  p, threshold, exp_p, output_scale, neg_lr, n, H, in_size, L: tl.constexpr, PREPROCESS: tl.constexpr,
                  HP: tl.constexpr, BLOCK: tl.constexpr):
        """DMOptimizer.step_flat on rows pid·BLOCK ...: App. A preprocessing, the L-layer LSTM, the output layer."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(grad_ptr + rows, mask=rows < n, other=0.0)
        k = tl.arange(0, 16)[None, :]  # layer 0's input, padded to the smallest tl.dot width
        if PREPROCESS:  # (log|g| / p, sgn g) if |g| >= e^-p else (-1, e^p g)   (dm.log_sign_preprocess)
            magnitude = tl.abs(g)
            large = magnitude >= threshold  # e^-p
            log_part = tl.where(large, tl.log(tl.where(large, magnitude, 1.0)) / p, -1.0)
            sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))
            sign_part = tl.where(large, sign, exp_p * g)
            x = tl.where(k == 0, log_part[:, None], tl.where(k == 1, sign_part[:, None], 0.0))
        else:
            x = tl.where(k == 0, g[:, None], 0.0)
        h = _load_cols(h_ptr, rows, n, L * H, 0, H, HP)
        c = _load_cols(c_ptr, rows, n, L * H, 0, H, HP)
        x, c = _lstm(x, h, c, w_ih0, w_hh, lstm_b, in_size, H, 16, HP)
        _store_cols(h_ptr, x, rows, n, L * H, 0, H, HP)
        _store_cols(c_ptr, c, rows, n, L * H, 0, H, HP)
        top = _deep_lstm(x, h_ptr, c_ptr, rows, n, w_ih, w_hh, lstm_b, H, L, HP)
        out = tl.sum(top * _vector(out_w, 0, 1, H, HP, 0.0)[None, :], axis=1) + tl.load(out_b)
        tl.store(update_ptr + rows, neg_lr * (output_scale * out), mask=rows < n)

    @triton.jit
    def rnnprop_kernel(grad_ptr, h_ptr, c_ptr, m_ptr, v_ptr, b1h_ptr, b2h_ptr, update_ptr, in_w, in_b, w_ih, w_hh,
                       lstm_b, out_w, out_b, b1, b2, output_bound, neg_lr, n, H, L: tl.constexpr, HP: tl.constexpr,
                       BLOCK: tl.constexpr):
        """RNNprop.step_flat on rows pid·BLOCK ...: Adam's moments, FC + ELU, the L-layer LSTM, the bounded output."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < n
        g = tl.load(grad_ptr + rows, mask=ok, other=0.0)
        m = b1 * tl.load(m_ptr + rows, mask=ok, other=0.0) + (1.0 - b1) * g
        v = b2 * tl.load(v_ptr + rows, mask=ok, other=0.0) + (1.0 - b2) * (g * g)
        b1_hat = b1 * tl.load(b1h_ptr + rows, mask=ok, other=0.0) + (1.0 - b1)
        b2_hat = b2 * tl.load(b2h_ptr + rows, mask=ok, other=0.0) + (1.0 - b2)
        root = tl.sqrt(v / b2_hat + 1e-16)
        x = _elu((g / root)[:, None] * _vector(in_w, 0, 2, H, HP, 0.0)[None, :]
                 + ((m / b1_hat) / root)[:, None] * _vector(in_w, 1, 2, H, HP, 0.0)[None, :]
                 + _vector(in_b, 0, 1, H, HP, 0.0)[None, :])
        x = tl.where(tl.arange(0, HP)[None, :] < H, x, 0.0)
        h = _load_cols(h_ptr, rows, n, L * H, 0, H, HP)
        c = _load_cols(c_ptr, rows, n, L * H, 0, H, HP)
        x, c = _lstm(x, h, c, w_ih, w_hh, lstm_b, H, H, HP, HP)
        _store_cols(h_ptr, x, rows, n, L * H, 0, H, HP)
        _store_cols(c_ptr, c, rows, n, L * H, 0, H, HP)
        top = _deep_lstm(x, h_ptr, c_ptr, rows, n, w_ih + 4 * H * H, w_hh, lstm_b, H, L, HP)
        out = tl.sum(top * _vector(out_w, 0, 1, H, HP, 0.0)[None, :], axis=1) + tl.load(out_b)
        tl.store(m_ptr + rows, m, mask=ok)
        tl.store(v_ptr + rows, v, mask=ok)
        tl.store(b1h_ptr + rows, b1_hat, mask=ok)
        tl.store(b2h_ptr + rows, b2_hat, mask=ok)
        tl.store(update_ptr + rows, neg_lr * (output_bound * _tanh(out)), mask=ok)

    KERNELS = {"hyperadam": hyperadam_kernel, "dm": dm_kernel, "rnnprop": rnnprop_kernel}
    if not _INTERPRETED:
        configs = [triton.Config({"BLOCK": block}, num_warps=warps) for block in (16, 32, 64, 128)
                   for warps in (2, 4, 8)]
        KERNELS = {name: triton.autotune(configs, key=["n"], restore_value=_STATE_ARGS[name])(kernel)
                   for name, kernel in KERNELS.items()}


def _width(size: int) -> int:
    """The padded tile width for a layer of ``size``: a power of 2, at least 16 (the smallest ``tl.dot``)."""
    return max(16, 1 << (size - 1).bit_length())


def _launch(name: str, n: int, *args: Any, **constexprs: Any) -> None:
    kernel = KERNELS[name]
    if _INTERPRETED:
        kernel[(-(-n // INTERPRET_BLOCK),)](*args, **constexprs, BLOCK=INTERPRET_BLOCK)
    else:
        kernel[lambda meta: (-(-n // meta["BLOCK"]),)](*args, **constexprs)


def _layers(cells: nn.ModuleList, skip_first_input: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The stacked LSTM's weights as the kernels read them: W_ih of layers 1.. (or all), W_hh and biases of all."""
    w_ih = [cell.weight_ih for cell in (cells[1:] if skip_first_input else cells)]
    w_ih_stacked = torch.stack(w_ih) if w_ih else cells[0].weight_hh.new_zeros(1)
    return (w_ih_stacked.contiguous(), torch.stack([cell.weight_hh for cell in cells]).contiguous(),
            torch.stack([cell.bias for cell in cells]).contiguous())


def _rms(x: Tensor, dim: int | None = None) -> Tensor:
    """sqrt(mean(x²) + TINY) over ``dim`` (cells.rms_normalize's divisor), without an (n, J) temporary."""

    count = x.numel() if dim is None else x.shape[dim]
    norm = torch.linalg.vector_norm(x) if dim is None else torch.linalg.vector_norm(x, dim=dim)
    return torch.sqrt(norm * norm / count + TINY)


@torch.no_grad()
def kernel_step(lopt: nn.Module, state_type: type, grad: Tensor, neg_lr: float, update: Tensor,
                *state: Tensor) -> None:
    """:func:`metaopt.learned.fast.flat_step` as one fused Triton kernel: the (n, k) ``state`` buffers are
    overwritten with the new state and ``update`` (n,) receives ``neg_lr · d``. The caller has checked the
    configuration with :func:`check_supported`."""
    n = grad.numel()
    if n == 0:
        return
    neg_lr = float(neg_lr)
    if lopt.kernel_name == "hyperadam":
        J = lopt.num_candidates
        s, c, m, v, beta_hat, gamma_hat = state
        _launch("hyperadam", n, grad, s, c, m, v, beta_hat, gamma_hat, update, _rms(grad).reshape(1), _rms(m, 0),
                lopt.pre.weight, lopt.pre.bias, lopt.lstm.weight_ih, lopt.lstm.weight_hh, lopt.lstm.bias,
                lopt.decay_beta.weight, lopt.decay_beta.bias, lopt.decay_gamma.weight, lopt.decay_gamma.bias,
                lopt.weight.weight, lopt.weight.bias, neg_lr, n, J, JP=_width(J))
    elif lopt.kernel_name == "dm":
        H, L = lopt.hidden_size, lopt.num_layers
        w_ih, w_hh, bias = _layers(lopt.lstm, skip_first_input=True)
        h, c = state
        _launch("dm", n, grad, h, c, update, lopt.lstm[0].weight_ih, w_ih, w_hh, bias, lopt.output.weight,
                lopt.output.bias, float(lopt.p), math.exp(-lopt.p), math.exp(lopt.p),
                float(lopt.output_scale), neg_lr, n, H, lopt.lstm[0].input_size, L=L,
                PREPROCESS=bool(lopt.preprocess), HP=_width(H))
    else:  # "rnnprop"
        H, L = lopt.hidden_size, lopt.num_layers
        w_ih, w_hh, bias = _layers(lopt.lstm, skip_first_input=False)
        h, c, m, v, b1_hat, b2_hat = state
        b1, b2 = lopt.betas
        _launch("rnnprop", n, grad, h, c, m, v, b1_hat, b2_hat, update, lopt.input.weight, lopt.input.bias, w_ih,
                w_hh, bias, lopt.output.weight, lopt.output.bias, b1, b2, float(lopt.output_bound), neg_lr, n, H,
                L=L, HP=_width(H))
