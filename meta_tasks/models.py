"""Learner networks ("optimizees") for the task families, and their initialisation.

This module owns the architectures the papers train with a learned or hypergradient optimizer, and the two helpers that
turn a module into explicit state for stateless use:

* HyperAdam (Wang, Sun & Xu, AAAI 2019, Sec. 4-5): :class:`MLP` (1-10 hidden layers of 20 units, sigmoid / ReLU / ELU /
  tanh), :class:`CNN1` (c-c-p-f), :class:`CNN2` (c-c-p-c-c-p-f-f), :class:`LSTMRegressor` (sine-sequence prediction).
* CAM-HD (adaptive hierarchical hyper-gradient descent, Sec. 4): FFNNs ``[100, 100]``, ``[1000, 100]``, ``[1000, 1000]``
  (:class:`MLP` with tuple widths), :class:`LeNet5`, :func:`resnet18`, :func:`resnet34`.
* MARTHE (Sec. 5-6): :class:`MLP` with three hidden layers of 500, :func:`vgg11_bn`, :func:`resnet18`.
* TLR (Sec. 5): :class:`MLP` with one hidden layer of 1000, :func:`wrn_16_4`.

Every model is a plain ``nn.Module`` whose state is only its parameters and buffers, so it runs statelessly as
``torch.func.functional_call(model, (params, buffers), (x,))``. The small models (MLP, CNN-1/CNN-2 without BatchNorm or
dropout, LSTMRegressor) also run under ``torch.func.vmap`` over a leading task dimension of stacked params.

:func:`gaussian_init` draws a fresh params dict from a ``torch.Generator`` (HyperAdam's "initial parameters ... sampled
independently from the Gaussian distribution"); :func:`buffers_of` copies the buffers (BatchNorm running statistics).
Each model exposes ``init_gain``, the fan-in gain :func:`gaussian_init` uses for its weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "CNN1",
    "CNN2",
    "UnrolledLSTM",
    "LSTMRegressor",
    "LeNet5",
    "VGG",
    "vgg11_bn",
    "resnet18",
    "resnet34",
    "WideResNet",
    "wrn_16_4",
    "gaussian_init",
    "buffers_of",
]

ACTIVATIONS: tuple[str, ...] = ("sigmoid", "relu", "elu", "tanh")

_ACTIVATION_FNS = {"sigmoid": torch.sigmoid, "relu": F.relu, "elu": F.elu, "tanh": torch.tanh}

# He et al. (2015): rectifiers halve the variance of their input, so weights feeding them need a gain of sqrt(2) to
# keep activations at unit scale; ELU is treated like ReLU. Saturating units (sigmoid, tanh) keep LeCun's gain 1.
_RELU_GAIN = math.sqrt(2.0)

# Layers whose affine parameters are a scale and a shift rather than weights: initialised to 1 and 0.
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _gain_for(activation: str) -> float:
    return _RELU_GAIN if activation in ("relu", "elu") else 1.0


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"Invalid activation: {activation!r}; expected one of {ACTIVATIONS}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; expected a positive integer")


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"Invalid dropout probability: {dropout}; expected 0 <= dropout < 1")


def _dropout(p: float) -> nn.Module:
    # p == 0 is an Identity rather than nn.Dropout(0): no random op in the graph, so vmap needs no randomness mode.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _conv3x3_block(in_channels: int, out_channels: int, batchnorm: bool) -> list[nn.Module]:
    """3x3 convolution (padding 1, size-preserving) -> [BatchNorm] -> ReLU."""
    # The convolution keeps its bias even with BatchNorm so that both variants share parameter names and layout.
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU())
    return layers


class MLP(nn.Module):
    """Fully connected classifier: HyperAdam's base learner and deep MLPs, CAM-HD's FFNNs, MARTHE's and TLR's MLPs.

    HyperAdam (Sec. 4) meta-trains on one hidden layer of 20 sigmoid units on MNIST and evaluates on 1-10 hidden layers
    of 20 units with sigmoid, ReLU, ELU or tanh (Sec. 5). CAM-HD (Sec. 4.2) uses ``hidden=(100, 100)``, ``(1000, 100)``,
    ``(1000, 1000)``; MARTHE (Sec. 5) ``hidden=500, depth=3``; TLR (Sec. 5) ``hidden=1000``.

    Args:
        in_features: size of the flattened input (784 for 28x28x1, 3072 for 32x32x3).
        hidden: width of every hidden layer, or a tuple with one width per hidden layer.
        depth: number of hidden layers when ``hidden`` is an int (default 1; HyperAdam uses 1-10). With a tuple
            ``hidden`` leave it as ``None`` (or give ``len(hidden)``).
        num_classes: number of output logits.
        activation: one of :data:`ACTIVATIONS`, applied after every hidden layer (not after the output layer).

    Shapes: input ``(B, C, H, W)`` or ``(B, in_features)``, flattened from dim 1 -> logits ``(B, num_classes)``.
    Parameters are ``layers.{i}.weight`` / ``layers.{i}.bias``; the last layer is the output layer.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: int | Sequence[int] = 20,
        depth: int | None = None,
        num_classes: int = 10,
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        _check_positive("in_features", in_features)
        _check_positive("num_classes", num_classes)
        _check_activation(activation)
        if isinstance(hidden, int):
            depth = 1 if depth is None else depth
            _check_positive("depth", depth)
            widths = (hidden,) * depth
        else:
            widths = tuple(hidden)
            if not widths:
                raise ValueError("Invalid hidden: empty sequence; an MLP needs at least one hidden layer")
            if depth is not None and depth != len(widths):
                raise ValueError(f"Invalid depth: {depth} disagrees with the {len(widths)} widths in hidden={widths}")
        for width in widths:
            _check_positive("hidden width", width)

        self.widths = widths
        self.activation = activation
        self.init_gain = _gain_for(activation)
        sizes = (in_features, *widths, num_classes)
        self.layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor) -> Tensor:
        act = _ACTIVATION_FNS[self.activation]
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = act(layer(h))
        return self.layers[-1](h)


class CNN1(nn.Module):
    """HyperAdam's CNN-1, c-c-p-f (Wang, Sun & Xu 2019, Sec. 5 "CNN").

    conv3x3 -> ReLU -> conv3x3 -> ReLU -> max-pool 2x2/2 -> fc. Convolutions have padding 1, so the only spatial
    reduction is the pool. The paper gives kernel and pool sizes but no widths: ``channels=(16, 32)`` and ReLU are our
    choice. The paper also trains CNN-1 "with batch normalization": ``batchnorm=True`` puts BatchNorm after each
    convolution (before ReLU); ``dropout > 0`` adds dropout before the fc layer.

    Shapes: input ``(B, in_channels, image_size, image_size)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        batchnorm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) != 2:
            raise ValueError(f"Invalid channels: {channels}; CNN-1 has 2 convolutions")
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            *(("channels", c) for c in channels),
        ):
            _check_positive(name, value)
        if image_size < 2:
            raise ValueError(f"Invalid image_size: {image_size}; CNN-1 pools once, so it needs image_size >= 2")
        _check_dropout(dropout)

        self.init_gain = _RELU_GAIN
        c1, c2 = channels
        self.features = nn.Sequential(
            *_conv3x3_block(in_channels, c1, batchnorm),
            *_conv3x3_block(c1, c2, batchnorm),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        side = image_size // 2
        self.classifier = nn.Sequential(_dropout(dropout), nn.Linear(c2 * side * side, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class CNN2(nn.Module):
    """HyperAdam's CNN-2, c-c-p-c-c-p-f-f (Wang, Sun & Xu 2019, Sec. 5 "CNN").

    Two blocks of (conv3x3 -> ReLU -> conv3x3 -> ReLU -> max-pool 2x2/2), then fc -> ReLU -> fc. Convolutions have
    padding 1. The paper gives no widths: ``channels=(16, 16, 32, 32)``, ``fc_hidden=128`` and ReLU are our choice.
    The paper also trains CNN-2 "with dropout": ``dropout > 0`` adds dropout before each fc layer; ``batchnorm=True``
    puts BatchNorm after each convolution (before ReLU).

    Shapes: input ``(B, in_channels, image_size, image_size)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels: Sequence[int] = (16, 16, 32, 32),
        fc_hidden: int = 128,
        batchnorm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) != 4:
            raise ValueError(f"Invalid channels: {channels}; CNN-2 has 4 convolutions")
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("fc_hidden", fc_hidden),
            *(("channels", c) for c in channels),
        ):
            _check_positive(name, value)
        if image_size < 4:
            raise ValueError(f"Invalid image_size: {image_size}; CNN-2 pools twice, so it needs image_size >= 4")
        _check_dropout(dropout)

        self.init_gain = _RELU_GAIN
        c1, c2, c3, c4 = channels
        self.features = nn.Sequential(
            *_conv3x3_block(in_channels, c1, batchnorm),
            *_conv3x3_block(c1, c2, batchnorm),
            nn.MaxPool2d(kernel_size=2, stride=2),
            *_conv3x3_block(c2, c3, batchnorm),
            *_conv3x3_block(c3, c4, batchnorm),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        side = image_size // 2 // 2
        self.classifier = nn.Sequential(
            _dropout(dropout),
            nn.Linear(c4 * side * side, fc_hidden),
            nn.ReLU(),
            _dropout(dropout),
            nn.Linear(fc_hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class UnrolledLSTM(nn.Module):
    """Multi-layer LSTM written out step by step, with ``torch.nn.LSTM``'s parameters, names and equations.

    ``nn.LSTM`` dispatches to fused kernels with flattened weight buffers that do not compose with
    ``functional_call`` + ``vmap``; this class computes the same function with explicit parameters. For layer ``k``:
    ``weight_ih_l{k}`` ``(4H, I_k)``, ``weight_hh_l{k}`` ``(4H, H)``, ``bias_ih_l{k}`` and ``bias_hh_l{k}`` ``(4H,)``,
    rows in PyTorch's gate order (i, f, g, o), so ``load_state_dict(nn.LSTM(...).state_dict())`` copies weights over::

        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)      f = sigmoid(W_if x + b_if + W_hf h + b_hf)
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)         o = sigmoid(W_io x + b_io + W_ho h + b_ho)
        c' = f * c + i * g                              h' = o * tanh(c')

    Batch-first, zero initial state, no inter-layer dropout.

    Shapes: input ``(B, L, input_size)`` -> output sequence of the top layer ``(B, L, hidden_size)``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            _check_positive(name, value)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        for k in range(num_layers):
            layer_input = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, layer_input)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.LSTM``'s default: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        seq = x.unbind(1)
        for k in range(self.num_layers):
            w_ih = getattr(self, f"weight_ih_l{k}")
            w_hh = getattr(self, f"weight_hh_l{k}")
            b = getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}")
            h = x.new_zeros(batch, self.hidden_size)
            c = x.new_zeros(batch, self.hidden_size)
            outputs = []
            for x_t in seq:
                gates = F.linear(x_t, w_ih) + F.linear(h, w_hh) + b
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            seq = outputs
        return torch.stack(seq, dim=1)


class LSTMRegressor(nn.Module):
    """HyperAdam's LSTM learner for sine-sequence prediction (Wang, Sun & Xu 2019, Sec. 5 "LSTM"; Lv et al. 2017).

    An LSTM with hidden state of 20 reads ``f(0), ..., f(9)`` and a linear head maps its last hidden state to the
    prediction of ``f(10)``. ``num_layers=2`` is the paper's "2-layer" variant. The recurrence is
    :class:`UnrolledLSTM` (``self.lstm``, ``nn.LSTM`` parameter names); the head is ``self.head``.

    Shapes: input ``(B, L, input_size)`` -> prediction ``(B, 1)``.
    """

    def __init__(self, input_size: int = 1, hidden: int = 20, num_layers: int = 1) -> None:
        super().__init__()
        # Gates are sigmoid/tanh units: LeCun's gain 1 keeps their pre-activations in the unsaturated range.
        self.init_gain = 1.0
        self.lstm = UnrolledLSTM(input_size, hidden, num_layers)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[:, -1])


class LeNet5(nn.Module):
    """LeNet-5 as used by CAM-HD (Sec. 4.1, 4.3): two convolutions with 6 and 16 5x5 filters, then fc 120-84-classes.

    conv5x5(6) -> ReLU -> max-pool 2x2/2 -> conv5x5(16) -> ReLU -> max-pool 2x2/2 -> fc 120 -> ReLU -> fc 84 -> ReLU
    -> fc num_classes. No dropout (CAM-HD: "no dropout is included"). The paper does not specify padding or
    activation: we use unpadded convolutions as in LeCun et al. (1998), so a 32x32 input reaches the original 16x5x5
    feature map and a 28x28 one 16x4x4, and ReLU with max-pooling, the common modern form.

    Shapes: input ``(B, in_channels, image_size, image_size)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"Invalid image_size: {image_size}; LeNet-5 needs image_size >= 14")
        self.init_gain = _RELU_GAIN
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


# torchvision's configuration "A" (VGG-11): output channels of 3x3 convolutions, "M" a 2x2 max-pool.
_VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """VGG for 32x32 inputs (Simonyan & Zisserman 2014), with BatchNorm (Ioffe & Szegedy 2015).

    ``features`` follows torchvision's layout for ``config`` (3x3 conv, padding 1 -> BatchNorm -> ReLU; "M" is a 2x2
    max-pool). Five pools bring a 32x32 image to 1x1, so the classifier is one Linear(512, num_classes) on the
    flattened map instead of ImageNet VGG's three 4096-wide layers on a 7x7 map (which would be ~120M parameters of
    replicated 1x1 features); this is the usual CIFAR VGG.

    Shapes: input ``(B, in_channels, 32, 32)`` -> logits ``(B, num_classes)``.
    """

    def __init__(
        self, config: Sequence[int | str] = _VGG11_CONFIG, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        self.init_gain = _RELU_GAIN
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            elif isinstance(item, int) and item > 0:
                layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
            else:
                raise ValueError(f"Invalid VGG config entry: {item!r}; expected a positive int or 'M'")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-11 with BatchNorm for CIFAR (MARTHE, Sec. 6: CIFAR-10); see :class:`VGG`.

    Input ``(B, in_channels, 32, 32)`` -> logits ``(B, num_classes)``.
    """
    return VGG(_VGG11_CONFIG, num_classes=num_classes, in_channels=in_channels)


def _cifar_resnet(layers: list[int], num_classes: int, in_channels: int) -> tv_resnet.ResNet:
    _check_positive("in_channels", in_channels)
    _check_positive("num_classes", num_classes)
    model = tv_resnet.ResNet(tv_resnet.BasicBlock, layers, num_classes=num_classes)
    # CIFAR stem (He et al. 2016, Sec. 4.2): a 7x7/2 conv and a max-pool would shrink 32x32 to 8x8 before any block.
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.init_gain = _RELU_GAIN
    return model


def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 (He et al. 2016) with the CIFAR stem (3x3 conv stride 1, no max-pool); CAM-HD Sec. 4.1, MARTHE Sec. 6.

    torchvision's ``ResNet`` with ``BasicBlock`` [2, 2, 2, 2]. Input ``(B, in_channels, H, W)`` (32x32 for CIFAR; the
    global average pool accepts any size >= 8) -> logits ``(B, num_classes)``.
    """
    return _cifar_resnet([2, 2, 2, 2], num_classes, in_channels)


def resnet34(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-34 (He et al. 2016) with the CIFAR stem; CAM-HD Sec. 4.4 (CIFAR-10).

    torchvision's ``ResNet`` with ``BasicBlock`` [3, 4, 6, 3]. Input ``(B, in_channels, H, W)`` -> ``(B, num_classes)``.
    """
    return _cifar_resnet([3, 4, 6, 3], num_classes, in_channels)


class _WideBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus shortcut.

    As in Zagoruyko & Komodakis' reference code, when the shape changes the 1x1 projection shortcut reads the
    pre-activated input ``relu(bn1(x))``; otherwise the shortcut is the identity on ``x``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = _dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(o)))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """Wide residual network WRN-depth-k (Zagoruyko & Komodakis 2016) with pre-activation blocks; TLR Sec. 5 (WRN-16-4).

    conv3x3(16) -> three groups of ``(depth - 4) / 6`` blocks with widths 16k, 32k, 64k and strides 1, 2, 2 ->
    BN -> ReLU -> global average pool -> Linear(64k, num_classes).

    Shapes: input ``(B, in_channels, H, W)`` (32x32 for CIFAR) -> logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"Invalid depth: {depth}; a wide ResNet has depth = 6n + 4 with n >= 1")
        _check_positive("widen_factor", widen_factor)
        _check_positive("in_channels", in_channels)
        _check_positive("num_classes", num_classes)
        _check_dropout(dropout)
        self.init_gain = _RELU_GAIN
        blocks_per_group = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        channels = 16
        groups = []
        for width, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for b in range(blocks_per_group):
                blocks.append(_WideBlock(channels, width, stride if b == 0 else 1, dropout))
                channels = width
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block3(self.block2(self.block1(self.conv1(x))))
        h = F.relu(self.bn(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def wrn_16_4(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-16-4 (TLR's CIFAR-10/100 network). Input ``(B, in_channels, 32, 32)`` -> logits ``(B, num_classes)``."""
    return WideResNet(depth=16, widen_factor=4, num_classes=num_classes, in_channels=in_channels)


def _owner(module: nn.Module, param_name: str) -> nn.Module:
    return module.get_submodule(param_name.rpartition(".")[0])


def gaussian_init(module: nn.Module, generator: torch.Generator, std: float | None = None) -> dict[str, Tensor]:
    """Draw a fresh set of initial parameters for ``module`` from ``generator`` alone.

    HyperAdam (Sec. 5, "Evaluation"): "All the initial parameters of learners ... are sampled independently from the
    Gaussian distribution", with no scale given. We choose:

    * weights (every parameter with ``dim >= 2``: linear, conv, LSTM matrices) ~ N(0, std^2) when ``std`` is given,
      else N(0, (gain / sqrt(fan_in))^2) with ``gain = module.init_gain`` (1, LeCun's scale, when the module has none;
      the models here set sqrt(2), He's scale, when their hidden units are ReLU/ELU). ``fan_in`` is
      ``shape[1] * prod(shape[2:])``. A fixed std would make deep or wide learners explode or vanish at step 0; the
      fan-in scale keeps every layer's pre-activations at unit order, so one rule serves all architectures.
    * biases (every other parameter with ``dim <= 1``) = 0, including all LSTM gate biases: the forget gate starts at
      sigmoid(0) = 1/2 rather than Jozefowicz et al.'s bias 1, keeping one uniform rule and all randomness in weights.
    * normalisation layers (BatchNorm, GroupNorm, LayerNorm): weight = 1, bias = 0, the identity transform.

    Draws follow ``module.named_parameters()`` order in each parameter's dtype on ``generator.device``, then move to the
    parameter's device, so a given generator state yields the same values on any device the module lives on. A
    module built on the "meta" device gets its tensors on ``generator.device``. The module is not modified.

    Args:
        module: the learner; only its parameter names, shapes, dtypes and devices are read.
        generator: the only source of randomness; its state advances.
        std: fixed standard deviation for all weights; ``None`` selects the fan-in scale above.

    Returns:
        A new ``{name: tensor}`` dict with the keys of ``module.named_parameters()``; tensors do not require grad.
    """
    if std is not None and not std > 0:
        raise ValueError(f"Invalid std: {std}; expected a positive float or None")
    gain = float(getattr(module, "init_gain", 1.0))
    params: dict[str, Tensor] = {}
    for name, p in module.named_parameters():
        device = generator.device if p.is_meta else p.device
        owner = _owner(module, name)
        if isinstance(owner, _NORM_TYPES):
            fill = 1.0 if name.endswith("weight") else 0.0
            value = torch.full(p.shape, fill, dtype=p.dtype, device=device)
        elif p.dim() >= 2:
            scale = std if std is not None else gain / math.sqrt(p.shape[1] * math.prod(p.shape[2:]))
            draw = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=generator.device)
            value = (draw * scale).to(device)
        else:
            value = torch.zeros(p.shape, dtype=p.dtype, device=device)
        params[name] = value
    return params


def buffers_of(module: nn.Module, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Fresh copies of ``module``'s buffers (BatchNorm ``running_mean``, ``running_var``, ``num_batches_tracked``).

    Pass them with the params to ``functional_call(module, (params, buffers), args)``: in training mode BatchNorm
    updates the running statistics in place in this dict, never the module's own buffers.

    Args:
        module: the learner.
        device: where to put the copies; ``None`` keeps each buffer's device. A module built on the "meta" device has
            no buffer values: the buffers of normalisation layers are then rebuilt in their reset state (mean 0,
            variance 1, count 0) on ``device`` (CPU when ``None``); any other meta buffer is an error.

    Returns:
        A new ``{name: tensor}`` dict with the keys of ``module.named_buffers()``.
    """
    buffers: dict[str, Tensor] = {}
    for name, b in module.named_buffers():
        if not b.is_meta:
            buffers[name] = b.detach().clone().to(b.device if device is None else device)
            continue
        owner = _owner(module, name)
        if not isinstance(owner, nn.modules.batchnorm._NormBase):
            raise ValueError(f"Buffer {name!r} lives on the meta device and has no known reset value")
        fill = 1.0 if name.endswith("running_var") else 0.0
        buffers[name] = torch.full(b.shape, fill, dtype=b.dtype, device="cpu" if device is None else device)
    return buffers
