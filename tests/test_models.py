"""Tests for meta_tasks.models: shapes, parameter counts, stateless use (functional_call, vmap), LSTM maths, init."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from meta_tasks.models import (
    ACTIVATIONS,
    CNN1,
    CNN2,
    MLP,
    LeNet5,
    LSTMRegressor,
    UnrolledLSTM,
    WideResNet,
    buffers_of,
    gaussian_init,
    resnet18,
    resnet34,
    vgg11_bn,
    wrn_16_4,
)

MNIST_SHAPE = (1, 28, 28)
CIFAR_SHAPE = (3, 32, 32)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes and parameter counts
# ---------------------------------------------------------------------------------------------------------------------

SMALL_MODELS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "mlp": lambda s, k: MLP(in_features=math.prod(s), num_classes=k),
    "cnn1": lambda s, k: CNN1(in_channels=s[0], image_size=s[1], num_classes=k),
    "cnn1-bn-dropout": lambda s, k: CNN1(in_channels=s[0], image_size=s[1], num_classes=k, batchnorm=True, dropout=0.5),
    "cnn2": lambda s, k: CNN2(in_channels=s[0], image_size=s[1], num_classes=k),
    "cnn2-bn-dropout": lambda s, k: CNN2(in_channels=s[0], image_size=s[1], num_classes=k, batchnorm=True, dropout=0.5),
    "lenet5": lambda s, k: LeNet5(in_channels=s[0], image_size=s[1], num_classes=k),
}


@pytest.mark.parametrize("name", list(SMALL_MODELS))
@pytest.mark.parametrize("shape", [MNIST_SHAPE, CIFAR_SHAPE])
def test_small_model_output_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = SMALL_MODELS[name](shape, 7)
    assert model(torch.randn(5, *shape)).shape == (5, 7)


@pytest.mark.parametrize("factory", [vgg11_bn, resnet18, resnet34, wrn_16_4])
def test_cifar_model_output_shape(factory: Callable[..., nn.Module]) -> None:
    model = factory(num_classes=100)
    assert model(torch.randn(2, *CIFAR_SHAPE)).shape == (2, 100)


@pytest.mark.parametrize("factory", [resnet18, wrn_16_4])
def test_cifar_model_accepts_grayscale_28x28(factory: Callable[..., nn.Module]) -> None:
    model = factory(num_classes=10, in_channels=1)
    assert model(torch.randn(2, *MNIST_SHAPE)).shape == (2, 10)


@pytest.mark.parametrize("depth", range(1, 11))
def test_mlp_depth(depth: int) -> None:
    model = MLP(hidden=20, depth=depth)
    assert len(model.layers) == depth + 1
    assert model(torch.randn(3, *MNIST_SHAPE)).shape == (3, 10)
    # 784*20 + 20, (depth - 1) * (20*20 + 20), 20*10 + 10
    assert n_params(model) == 15_700 + (depth - 1) * 420 + 210


@pytest.mark.parametrize("widths", [(100, 100), (1000, 100), (1000, 1000), (500, 500, 500)])
def test_mlp_tuple_widths(widths: tuple[int, ...]) -> None:
    model = MLP(hidden=widths)
    assert tuple(layer.out_features for layer in model.layers) == (*widths, 10)
    assert model(torch.randn(3, 784)).shape == (3, 10)
    sizes = (784, *widths, 10)
    assert n_params(model) == sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def test_mlp_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="activation"):
        MLP(activation="softplus")
    with pytest.raises(ValueError, match="depth"):
        MLP(hidden=(100, 100), depth=3)
    with pytest.raises(ValueError, match="depth"):
        MLP(depth=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_matches_explicit_formula(activation: str) -> None:
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=(8, 6), num_classes=4, activation=activation)
    act = {"sigmoid": torch.sigmoid, "relu": torch.relu, "elu": F.elu, "tanh": torch.tanh}[activation]
    x = torch.randn(5, 3, 2, 2)
    (w1, b1), (w2, b2), (w3, b3) = ((layer.weight, layer.bias) for layer in model.layers)
    expected = act(act(x.reshape(5, 12) @ w1.T + b1) @ w2.T + b2) @ w3.T + b3
    torch.testing.assert_close(model(x), expected)


def test_known_parameter_counts() -> None:
    assert n_params(MLP()) == 15_910  # 784-20-10: 784*20 + 20 + 20*10 + 10
    # LeNet-5, unpadded 5x5 convs: 28 -> 24 -> pool 12 -> 8 -> pool 4, so fc1 reads 16*4*4.
    lenet_mnist = (1 * 25 * 6 + 6) + (6 * 25 * 16 + 16) + (16 * 4 * 4 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert lenet_mnist == 44_426
    assert n_params(LeNet5()) == lenet_mnist
    # On 32x32x3 the original 16x5x5 map: 456 + 2416 + 48120 + 10164 + 850.
    assert n_params(LeNet5(in_channels=3, image_size=32)) == 62_006
    # CNN-1 on 28x28x1: conv 1->16, conv 16->32, fc 32*14*14 -> 10.
    assert n_params(CNN1()) == (9 * 16 + 16) + (16 * 9 * 32 + 32) + (32 * 14 * 14 * 10 + 10)
    # CNN-2 on 28x28x1: convs 1->16->16->32->32, fc 32*7*7 -> 128 -> 10.
    cnn2 = (9 * 16 + 16) + (16 * 9 * 16 + 16) + (16 * 9 * 32 + 32) + (32 * 9 * 32 + 32)
    assert n_params(CNN2()) == cnn2 + (32 * 7 * 7 * 128 + 128) + (128 * 10 + 10)
    # LSTM(1 -> 20) + Linear(20 -> 1): 4*20*(1 + 20 + 2) + 21.
    assert n_params(LSTMRegressor()) == 1_861
    # The standard CIFAR-10 counts of these architectures (e.g. kuangliu/pytorch-cifar; WRN paper's 2.7M).
    assert n_params(vgg11_bn()) == 9_231_114
    assert n_params(resnet18()) == 11_173_962
    assert n_params(resnet34()) == 21_282_122
    assert n_params(wrn_16_4()) == 2_748_890


def test_wide_resnet_rejects_bad_depth() -> None:
    with pytest.raises(ValueError, match="depth"):
        WideResNet(depth=15)


# ---------------------------------------------------------------------------------------------------------------------
# Stateless use
# ---------------------------------------------------------------------------------------------------------------------

FUNCTIONAL_MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: MLP(hidden=(30, 20), activation="tanh"),
    "cnn1": lambda: CNN1(),
    "cnn2": lambda: CNN2(),
    "lenet5": lambda: LeNet5(),
    "cnn1-bn": lambda: CNN1(batchnorm=True),
}


@pytest.mark.parametrize("name", list(FUNCTIONAL_MODELS))
def test_functional_call_equals_loaded_module(name: str) -> None:
    model = FUNCTIONAL_MODELS[name]().eval()
    params = gaussian_init(model, seeded(1))
    buffers = buffers_of(model)
    x = torch.randn(4, *MNIST_SHAPE)
    out = functional_call(model, (params, buffers), (x,))
    model.load_state_dict({**params, **buffers})
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_functional_call_lstm_equals_loaded_module() -> None:
    model = LSTMRegressor(num_layers=2)
    params = gaussian_init(model, seeded(2))
    x = torch.randn(4, 10, 1)
    out = functional_call(model, params, (x,))
    model.load_state_dict(params)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def _perturbed_bn_buffers(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    buffers = buffers_of(model)
    for name, b in buffers.items():
        if name.endswith("running_mean"):
            buffers[name] = torch.randn(b.shape, generator=generator)
        elif name.endswith("running_var"):
            buffers[name] = torch.rand(b.shape, generator=generator) + 0.5
    return buffers


@pytest.mark.parametrize("factory", [resnet18, wrn_16_4, vgg11_bn])
def test_functional_call_uses_passed_bn_buffers_in_eval(factory: Callable[..., nn.Module]) -> None:
    model = factory().eval()
    generator = seeded(3)
    params = gaussian_init(model, generator)
    buffers = _perturbed_bn_buffers(model, generator)
    x = torch.randn(2, *CIFAR_SHAPE, generator=generator)
    out = functional_call(model, (params, buffers), (x,))
    default_stats = functional_call(model, (params, buffers_of(model)), (x,))
    assert not torch.allclose(out, default_stats)  # the passed running stats are the ones used
    model.load_state_dict({**params, **buffers})
    torch.testing.assert_close(out, model(x))


def test_functional_call_updates_passed_bn_buffers_in_train_mode() -> None:
    model = CNN2(batchnorm=True).train()
    params = gaussian_init(model, seeded(4))
    buffers = buffers_of(model)
    own = {name: b.clone() for name, b in model.named_buffers()}
    x = torch.randn(8, *MNIST_SHAPE)
    functional_call(model, (params, buffers), (x,))
    assert buffers["features.1.num_batches_tracked"].item() == 1
    first = model.features[0]
    h = F.conv2d(x, params["features.0.weight"], params["features.0.bias"], padding=first.padding)
    # momentum 0.1 from mean 0 / var 1, with the unbiased batch variance, as nn.BatchNorm2d documents.
    torch.testing.assert_close(buffers["features.1.running_mean"], 0.1 * h.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(buffers["features.1.running_var"], 0.9 + 0.1 * h.var(dim=(0, 2, 3), unbiased=True))
    for name, b in model.named_buffers():  # the module's own buffers are untouched
        torch.testing.assert_close(b, own[name], rtol=0, atol=0)


VMAP_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: MLP(depth=3, activation="relu"), (6, *MNIST_SHAPE)),
    "cnn1": (lambda: CNN1(in_channels=3, image_size=32), (6, *CIFAR_SHAPE)),
    "cnn2": (lambda: CNN2(), (6, *MNIST_SHAPE)),
    "lstm": (lambda: LSTMRegressor(), (6, 10, 1)),
    "lstm-2layer": (lambda: LSTMRegressor(num_layers=2), (6, 10, 1)),
}


@pytest.mark.parametrize("name", list(VMAP_MODELS))
def test_vmap_over_stacked_params_equals_loop(name: str) -> None:
    factory, input_shape = VMAP_MODELS[name]
    model = factory()
    task_params = [gaussian_init(model, seeded(10 + k)) for k in range(3)]
    stacked = {key: torch.stack([p[key] for p in task_params]) for key in task_params[0]}
    x = torch.randn(input_shape)

    def forward(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return functional_call(model, params, (inputs,))

    shared_x = vmap(forward, in_dims=(0, None))(stacked, x)
    looped = torch.stack([forward(p, x) for p in task_params])
    torch.testing.assert_close(shared_x, looped)
    # Each task on its own batch too.
    xs = torch.randn(3, *input_shape)
    per_task_x = vmap(forward)(stacked, xs)
    torch.testing.assert_close(per_task_x, torch.stack([forward(p, xk) for p, xk in zip(task_params, xs)]))


def test_vmap_grad_over_stacked_params() -> None:
    model = MLP(in_features=10, hidden=8, depth=2)
    models = [MLP(in_features=10, hidden=8, depth=2) for _ in range(3)]
    stacked, _ = stack_module_state(models)
    x, y = torch.randn(5, 10), torch.randint(0, 10, (5,))

    def loss(params: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    grads = vmap(torch.func.grad(loss))(stacked)
    for k, m in enumerate(models):
        F.cross_entropy(m(x), y).backward()
        for key, p in m.named_parameters():
            torch.testing.assert_close(grads[key][k], p.grad)


# ---------------------------------------------------------------------------------------------------------------------
# LSTM maths against torch.nn.LSTM
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_regressor_equals_torch_lstm(num_layers: int) -> None:
    torch.manual_seed(5)
    reference = nn.LSTM(input_size=3, hidden_size=20, num_layers=num_layers, batch_first=True).double()
    head = nn.Linear(20, 1).double()
    model = LSTMRegressor(input_size=3, hidden=20, num_layers=num_layers).double()
    model.lstm.load_state_dict(reference.state_dict())
    model.head.load_state_dict(head.state_dict())
    x = torch.randn(4, 10, 3, dtype=torch.float64)
    sequence, (h_n, _) = reference(x)
    torch.testing.assert_close(model.lstm(x), sequence)
    torch.testing.assert_close(model(x), head(h_n[-1]))
    torch.testing.assert_close(model(x), head(sequence[:, -1]))


def test_unrolled_lstm_parameter_names_match_torch() -> None:
    ours = UnrolledLSTM(2, 5, num_layers=3)
    theirs = nn.LSTM(2, 5, num_layers=3)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# gaussian_init and buffers_of
# ---------------------------------------------------------------------------------------------------------------------


def test_gaussian_init_reproducible_and_seed_dependent() -> None:
    model = CNN2()
    a, b, c = (gaussian_init(model, seeded(s)) for s in (7, 7, 8))
    assert list(a) == [name for name, _ in model.named_parameters()]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    weights = [name for name in a if a[name].dim() >= 2]
    assert all(not torch.equal(a[name], c[name]) for name in weights)


def test_gaussian_init_does_not_touch_module_or_global_rng() -> None:
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    params = gaussian_init(model, seeded(0))
    assert torch.equal(torch.get_rng_state(), rng_state)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
        assert params[name] is not value
    assert not any(p.requires_grad for p in params.values())


def test_gaussian_init_fixed_std() -> None:
    model = MLP(hidden=1000)
    params = gaussian_init(model, seeded(0), std=0.05)
    weight = params["layers.0.weight"]  # 784_000 draws: the std estimate is within ~0.2 %
    assert abs(weight.std().item() - 0.05) < 0.05 * 0.01
    assert abs(weight.mean().item()) < 0.05 * 0.01
    for name, value in params.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(value) == 0


@pytest.mark.parametrize(("activation", "gain"), [("sigmoid", 1.0), ("tanh", 1.0), ("relu", 2**0.5), ("elu", 2**0.5)])
def test_gaussian_init_fan_in_scale(activation: str, gain: float) -> None:
    model = MLP(hidden=(1000, 500), activation=activation)
    params = gaussian_init(model, seeded(0))
    for name, fan_in in (("layers.0.weight", 784), ("layers.1.weight", 1000)):
        expected = gain / math.sqrt(fan_in)
        assert abs(params[name].std().item() - expected) < 0.01 * expected


def test_gaussian_init_conv_fan_in_norm_layers_and_lstm_biases() -> None:
    model = resnet18()
    params = gaussian_init(model, seeded(0))
    conv = params["layer4.0.conv2.weight"]  # (512, 512, 3, 3): fan_in 4608
    expected = math.sqrt(2) / math.sqrt(512 * 9)
    assert abs(conv.std().item() - expected) < 0.01 * expected
    assert torch.all(params["bn1.weight"] == 1) and torch.all(params["bn1.bias"] == 0)
    assert torch.all(params["fc.bias"] == 0)

    lstm_params = gaussian_init(LSTMRegressor(num_layers=2), seeded(0))
    for name, value in lstm_params.items():
        if "bias" in name:
            assert torch.count_nonzero(value) == 0


def test_gaussian_init_rejects_bad_std() -> None:
    with pytest.raises(ValueError, match="std"):
        gaussian_init(MLP(), seeded(0), std=0.0)


def test_gaussian_init_follows_module_dtype_and_device() -> None:
    model = LSTMRegressor().to(torch.float64)
    params = gaussian_init(model, seeded(0))
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in params.values())
    out = functional_call(model, params, (torch.randn(2, 10, 1, dtype=torch.float64),))
    assert out.dtype == torch.float64 and out.shape == (2, 1)


def test_meta_device_module() -> None:
    with torch.device("meta"):
        meta_model = CNN1(batchnorm=True)
    cpu_model = CNN1(batchnorm=True)
    meta_params = gaussian_init(meta_model, seeded(9))
    cpu_params = gaussian_init(cpu_model, seeded(9))
    for name, value in cpu_params.items():
        assert meta_params[name].device.type == "cpu"
        torch.testing.assert_close(meta_params[name], value, rtol=0, atol=0)
    meta_buffers = buffers_of(meta_model)
    for name, value in buffers_of(cpu_model).items():
        assert meta_buffers[name].device.type == "cpu"
        torch.testing.assert_close(meta_buffers[name], value, rtol=0, atol=0)
    x = torch.randn(2, *MNIST_SHAPE)
    out = functional_call(meta_model.eval(), (meta_params, meta_buffers), (x,))
    torch.testing.assert_close(out, functional_call(cpu_model.eval(), (cpu_params, buffers_of(cpu_model)), (x,)))


def test_buffers_of_returns_fresh_copies() -> None:
    model = wrn_16_4()
    buffers = buffers_of(model)
    assert list(buffers) == [name for name, _ in model.named_buffers()]
    buffers["bn.running_mean"].add_(1.0)
    assert torch.count_nonzero(model.bn.running_mean) == 0
    assert buffers_of(MLP()) == {}
