"""meta_tasks: the learners, datasets, tasks and task families that optimizers are trained and evaluated on.

Public API (a contract, see DESIGN.md)::

    meta_tasks.TASKS                                    # names of the registered tasks
    task = meta_tasks.get_task("mlp-sigmoid", dataset="fashion-mnist", device="cpu")
    meta_tasks.FAMILIES                                 # names of the registered task families
    family = meta_tasks.get_family("mlp-activations")

Every image task takes ``dataset=`` ("fashion-mnist" by default — it stands in where the papers used MNIST;
"mnist" and "cifar10" switch), ``data_root=``, ``device=``, ``batch_size=`` (128) and ``init_std=`` (None: a fan-in
scaled Gaussian). Architecture options are listed per task in :data:`TASK_OPTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from meta_tasks import datasets, models, tricks
from meta_tasks.base import Batch, ChoiceFamily, FixedFamily, Task, TaskFamily, TransformedFamily
from meta_tasks.tasks import QuadraticTask, SineRegressionTask, SupervisedTask, sine_noise_std

CNN_DROPOUT = 0.5  # HyperAdam trains CNN-2 "with dropout" without giving the rate; 0.5 is the usual choice
DEEP_MLP_DEPTH = 9  # HyperAdam's long-horizon deep MLP (Fig. 7a); the depth suite passes depth=1..10


class PadTo(nn.Module):
    """Zero-pads square images up to ``size`` pixels (VGG-11's five poolings need 32×32; Fashion-MNIST is 28×28)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.size - x.shape[-1]
        return nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad > 0 else x


LearnerFactory = Callable[[int, int, int], nn.Module]  # (in_channels, image_size, num_classes) -> learner


def _mlp(activation: str) -> Callable[..., LearnerFactory]:
    def options(hidden: int | tuple[int, ...] = 20, depth: int | None = None) -> LearnerFactory:
        return lambda c, s, k: models.MLP(c * s * s, hidden, depth, k, activation)
    return options


def _deep_mlp(depth: int = DEEP_MLP_DEPTH, hidden: int = 20, activation: str = "sigmoid") -> LearnerFactory:
    return lambda c, s, k: models.MLP(c * s * s, hidden, depth, k, activation)


def _ffnn(hidden: tuple[int, ...] = (100, 100), activation: str = "relu") -> LearnerFactory:
    # CAM-HD Sec. 4.2: [100, 100], [1000, 100], [1000, 1000]; the paper names no activation, ReLU is our choice.
    return lambda c, s, k: models.MLP(c * s * s, tuple(hidden), None, k, activation)


def _cnn(cls: type[nn.Module], batchnorm: bool = False, dropout: float = 0.0) -> Callable[..., LearnerFactory]:
    def options(batchnorm: bool = batchnorm, dropout: float = dropout, **arch: Any) -> LearnerFactory:
        return lambda c, s, k: cls(c, s, k, batchnorm=batchnorm, dropout=dropout, **arch)
    return options


def _lenet5() -> LearnerFactory:
    return lambda c, s, k: models.LeNet5(c, s, k)


def _vgg11() -> LearnerFactory:
    return lambda c, s, k: (models.vgg11_bn(k, c) if s >= 32 else nn.Sequential(PadTo(32), models.vgg11_bn(k, c)))


def _cifar_net(build: Callable[[int, int], nn.Module]) -> Callable[[], LearnerFactory]:
    return lambda: (lambda c, s, k: build(k, c))


# name -> options function returning a learner factory
_IMAGE_TASKS: dict[str, Callable[..., LearnerFactory]] = {
    "mlp-sigmoid": _mlp("sigmoid"),
    "mlp-relu": _mlp("relu"),
    "mlp-elu": _mlp("elu"),
    "mlp-tanh": _mlp("tanh"),
    "mlp-deep": _deep_mlp,
    "cnn-1": _cnn(models.CNN1),
    "cnn-2": _cnn(models.CNN2),
    "cnn-1-bn": _cnn(models.CNN1, batchnorm=True),
    "cnn-2-dropout": _cnn(models.CNN2, dropout=CNN_DROPOUT),
    "lenet5": _lenet5,
    "vgg11": _vgg11,
    "resnet18": _cifar_net(models.resnet18),
    "resnet34": _cifar_net(models.resnet34),
    "wrn-16-4": _cifar_net(models.wrn_16_4),
    "ffnn": _ffnn,
}

# name -> (noise std, LSTM layers)
_SINE_TASKS: dict[str, tuple[float, int]] = {
    "lstm-sine": (sine_noise_std(small_noise=False), 1),
    "lstm-sine-small-noise": (sine_noise_std(small_noise=True), 1),
    "lstm-sine-2layer": (sine_noise_std(small_noise=False), 2),
}

TASKS: tuple[str, ...] = (*_IMAGE_TASKS, *_SINE_TASKS, "quadratic")


def get_task(name: str, *, dataset: str = "fashion-mnist", data_root: str | None = None,
             device: torch.device | str = "cpu", batch_size: int = 128, init_std: float | None = None,
             val_size: int = 5000, **options: Any) -> Task:
    """Build the task registered as ``name``.

    Image tasks load ``dataset`` (held on ``device``) and accept architecture ``options`` (e.g. ``depth=`` for
    ``mlp-deep``, ``hidden=`` for ``ffnn``, ``channels=`` for the CNNs). ``lstm-sine*`` take ``hidden=``;
    ``quadratic`` takes ``dim=`` (10) and ``seed=`` (0) for its W and y, and ``scale=`` (1) for its loss. Unknown
    names raise ``ValueError`` listing
    :data:`TASKS`.
    """
    if name in _IMAGE_TASKS:
        data = datasets.load_dataset(dataset, data_root, device=device, val_size=val_size)
        c, s, _ = data.input_shape
        learner = _IMAGE_TASKS[name](**options)(c, s, data.num_classes)
        return SupervisedTask(name, learner, data, batch_size=batch_size, init_std=init_std)
    if name in _SINE_TASKS:
        noise_std, layers = _SINE_TASKS[name]
        learner = models.LSTMRegressor(1, options.pop("hidden", 20), layers)
        if options:
            raise TypeError(f"get_task({name!r}): unexpected options {sorted(options)}")
        return SineRegressionTask(name, learner, datasets.SineSequences(noise_std), batch_size=batch_size,
                                  init_std=init_std, device=device)
    if name == "quadratic":
        dim, seed, scale = options.pop("dim", 10), options.pop("seed", 0), options.pop("scale", 1.0)
        if options:
            raise TypeError(f"get_task('quadratic'): unexpected options {sorted(options)}")
        return QuadraticTask.sample(torch.Generator().manual_seed(seed), dim=dim, device=device, scale=scale)
    raise ValueError(f"Unknown task {name!r}. Valid names: {', '.join(TASKS)}")


class QuadraticFamily(TaskFamily):
    """Random quadratics ‖Wθ − y‖² (Andrychowicz et al. 2016): a new W, y per instance."""

    name = "quadratic"

    def __init__(self, dim: int = 10, device: torch.device | str = "cpu"):
        self.dim, self.device = dim, device

    def sample(self, generator: torch.Generator) -> Task:
        return QuadraticTask.sample(generator, self.dim, self.device)


def _family_hyperadam_mlp(**kw: Any) -> TaskFamily:
    return FixedFamily(get_task("mlp-sigmoid", **kw))


def _family_mlp_activations(**kw: Any) -> TaskFamily:
    names = ("mlp-sigmoid", "mlp-relu", "mlp-elu", "mlp-tanh")
    return ChoiceFamily("mlp-activations", [lambda n=n: get_task(n, **kw) for n in names])


def _family_mlp_cnn(**kw: Any) -> TaskFamily:
    names = ("mlp-sigmoid", "mlp-relu", "ffnn", "cnn-1")
    return ChoiceFamily("mlp-cnn", [lambda n=n: get_task(n, **kw) for n in names])


# The broad family of checkpoints/hyperadam-general (issue 12): (name, architecture options) per member, drawn
# uniformly. MLPs of four activations at the paper's 784-20-10 and at other widths and depths; two small CNNs (CNN-1
# at a quarter and half of the suites' channels, without batch norm, whose running statistics vmapped meta-training
# cannot batch), so the suites' CNN-1 / CNN-2 stay unseen sizes; the LSTM sine regression at a smaller hidden size
# than Table 2's; a linear least-squares regression (a quadratic). Every member is meta-trained with the run's Random
# Scaling and convex term. Widths, depths and channel counts differ from the suites' where the suites vary them.
GENERAL_MEMBERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("mlp-sigmoid", {}), ("mlp-relu", {}), ("mlp-elu", {}), ("mlp-tanh", {}),
    ("mlp-relu", {"hidden": 40}), ("mlp-tanh", {"hidden": 10}),
    ("mlp-deep", {"depth": 2, "hidden": 30, "activation": "relu"}),
    ("mlp-deep", {"depth": 4, "hidden": 16, "activation": "sigmoid"}),
    ("cnn-1", {"channels": (4, 8)}), ("cnn-1", {"channels": (8, 8)}),
    ("lstm-sine", {"hidden": 10}),
    ("quadratic", {"dim": 20}),
)


def _family_general(**kw: Any) -> TaskFamily:
    return ChoiceFamily("general", [lambda n=n, o=o: get_task(n, **kw, **o) for n, o in GENERAL_MEMBERS])


def _family_quadratic(dim: int = 10, device: torch.device | str = "cpu", dataset: str | None = None) -> TaskFamily:
    # quadratics have no data: ``dataset`` is accepted (and ignored) so every family takes the same options
    return QuadraticFamily(dim, device)


_FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "hyperadam-mlp": _family_hyperadam_mlp,  # HyperAdam's meta-training task: MLP 784-20-10, sigmoid
    "mlp-activations": _family_mlp_activations,
    "mlp-cnn": _family_mlp_cnn,  # the learned gamma / mu rules' family: MLPs and a CNN
    "quadratic": _family_quadratic,
    "general": _family_general,  # checkpoints/hyperadam-general's broad family (GENERAL_MEMBERS)
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def get_family(name: str, **options: Any) -> TaskFamily:
    """Build the task family registered as ``name`` (options as for :func:`get_task`)."""
    if name not in _FAMILIES:
        raise ValueError(f"Unknown task family {name!r}. Valid names: {', '.join(FAMILIES)}")
    return _FAMILIES[name](**options)


__all__ = ["TASKS", "FAMILIES", "Task", "TaskFamily", "Batch", "FixedFamily", "ChoiceFamily", "TransformedFamily",
           "QuadraticFamily", "get_task", "get_family", "datasets", "models", "tricks"]
