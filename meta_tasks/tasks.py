"""The concrete tasks: supervised learners on image datasets, LSTM regression of sine sequences, random quadratics.

Losses are batch means (cross-entropy for classification, squared error for regression). HyperAdam writes its
optimizee as a *sum* over the minibatch; the mean differs by the constant factor 128 and keeps learning rates
comparable across batch sizes, and HyperAdam's update is invariant to the scale of the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meta_tasks.base import Batch, Params, Task, call_learner, eval_mode, seeded
from meta_tasks.datasets import ImageDataset, SineSequences
from meta_tasks.models import buffers_of, gaussian_init

EVAL_CHUNK = 2048  # examples per forward pass in evaluate(): bounds memory for the big learners


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())


def _topk_correct(logits: Tensor, y: Tensor, k: int) -> Tensor:
    return (logits.topk(k, dim=-1).indices == y.unsqueeze(-1)).any(-1).sum()


class LearnerTask(Task):
    """A task whose parameters are those of an ``nn.Module`` learner, initialized by ``gaussian_init``.

    Args:
        name: the task's registry name.
        learner: the nn.Module (its own parameter values are never used; :meth:`init` draws new ones).
        device: where the learner and the data live.
        batch_size: default minibatch size (HyperAdam: 128).
        init_std: standard deviation of the Gaussian initialization (None: fan-in scaled, see ``gaussian_init``).
    """

    def __init__(self, name: str, learner: nn.Module, device: torch.device | str, batch_size: int = 128,
                 init_std: float | None = None):
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected >= 1)")
        self.name, self.batch_size, self.init_std = name, batch_size, init_std
        self._device = torch.device(device)
        self.learner = learner.to(self._device)
        self._shapes = {n: p.shape for n, p in self.learner.named_parameters()}

    @property
    def device(self) -> torch.device:
        return self._device

    def param_shapes(self) -> dict[str, torch.Size]:
        return dict(self._shapes)

    def init(self, generator: torch.Generator) -> Params:
        return gaussian_init(self.learner, generator, self.init_std)


class SupervisedTask(LearnerTask):
    """Classification of an image dataset (an :class:`~meta_tasks.datasets.ImageDataset`, whose device is the
    task's) by ``learner`` with cross-entropy loss; other arguments as :class:`LearnerTask`."""

    def __init__(self, name: str, learner: nn.Module, data: ImageDataset, batch_size: int = 128,
                 init_std: float | None = None):
        super().__init__(name, learner, data.train.x.device, batch_size, init_std)
        self.data = data
        self._dropout = _has_dropout(self.learner)

    def init_buffers(self) -> Params:
        return buffers_of(self.learner)

    def sample_batch(self, generator: torch.Generator, split: str = "train", batch_size: int | None = None) -> Batch:
        x, y = self.data.batch(split, batch_size or self.batch_size, generator)
        seed = None
        if self._dropout:  # drawn on the generator's own device (a CUDA generator cannot fill a CPU tensor)
            seed = int(torch.randint(2**62, (), generator=generator, device=generator.device))
        return Batch(x, y, seed)

    def logits(self, params: Params, x: Tensor, buffers: Params | None = None, seed: int | None = None) -> Tensor:
        if buffers is None and any(True for _ in self.learner.buffers()):
            buffers = self.init_buffers()  # scratch copies: a call never changes the task
        with seeded(seed, self._device):
            return call_learner(self.learner, params, buffers, x)

    def loss(self, params: Params, batch: Batch, buffers: Params | None = None) -> Tensor:
        return F.cross_entropy(self.logits(params, batch.x, buffers, batch.seed), batch.y)

    @torch.no_grad()
    def evaluate(self, params: Params, split: str = "test", buffers: Params | None = None) -> dict[str, float]:
        x, y = self.data.full(split)
        total_loss, top1, top2 = 0.0, 0, 0
        with eval_mode(self.learner):
            for start in range(0, len(y), EVAL_CHUNK):
                logits = self.logits(params, x[start:start + EVAL_CHUNK], buffers)
                yy = y[start:start + EVAL_CHUNK]
                total_loss += float(F.cross_entropy(logits, yy, reduction="sum"))
                top1 += int(_topk_correct(logits, yy, 1))
                top2 += int(_topk_correct(logits, yy, min(2, logits.shape[-1])))
        n = len(y)
        return {"loss": total_loss / n, "top1": top1 / n, "top2": top2 / n}


class SineRegressionTask(LearnerTask):
    """HyperAdam Sec. 5's LSTM task: predict f(10) from a noisy f(0..9), f(x) = A sin(w x + φ), squared error.

    Training batches are fresh draws from the generator; the "test" (and "val") split is a fixed set of
    ``eval_size`` sequences generated from a fixed seed, so evaluations are comparable across runs.
    """

    def __init__(self, name: str, learner: nn.Module, data: SineSequences, batch_size: int = 128,
                 init_std: float | None = None, device: torch.device | str = "cpu", eval_size: int = 1000):
        super().__init__(name, learner, device, batch_size, init_std)
        self.data, self.eval_size = data, eval_size

    def sample_batch(self, generator: torch.Generator, split: str = "train", batch_size: int | None = None) -> Batch:
        if split != "train":
            return self._fixed_split(split)
        x, y = self.data.batch(batch_size or self.batch_size, generator, device=self._device)
        return Batch(x, y)

    def _fixed_split(self, split: str) -> Batch:
        seeds = {"val": 1, "test": 2}
        if split not in seeds:
            raise ValueError(f"Unknown split {split!r} (expected train, val or test)")
        gen = torch.Generator(device=self._device).manual_seed(seeds[split])
        x, y = self.data.batch(self.eval_size, gen, device=self._device)
        return Batch(x, y)

    def loss(self, params: Params, batch: Batch, buffers: Params | None = None) -> Tensor:
        return F.mse_loss(call_learner(self.learner, params, None, batch.x), batch.y)

    @torch.no_grad()
    def evaluate(self, params: Params, split: str = "test", buffers: Params | None = None) -> dict[str, float]:
        return {"loss": float(self.loss(params, self._fixed_split(split)))}


class QuadraticTask(Task):
    """f(θ) = s‖Wθ − y‖² with W ∈ R^{d×d}, y ∈ R^d drawn from N(0, 1) per instance (Andrychowicz et al. 2016, Sec.
    3.1) and a fixed loss scale s (1 by default; a smaller one keeps hypergradient methods, whose rate updates grow
    with the square of the gradients, stable at their default hyper-parameters).

    Deterministic (batches are empty); ``init`` draws θ₀ ~ N(0, 1). Used for meta-gradient checks, golden tests and as
    a cheap task family (:class:`QuadraticFamily`).
    """

    def __init__(self, W: Tensor, y: Tensor, name: str = "quadratic", scale: float = 1.0):
        if W.dim() != 2 or W.shape[0] != y.shape[0]:
            raise ValueError(f"QuadraticTask needs W (m, d) and y (m,), got {tuple(W.shape)} and {tuple(y.shape)}")
        if not scale > 0:
            raise ValueError(f"Invalid scale: {scale} (expected > 0)")
        self.name, self.W, self.y, self.scale = name, W, y, scale

    @classmethod
    def sample(cls, generator: torch.Generator, dim: int = 10, device: torch.device | str = "cpu",
               scale: float = 1.0) -> "QuadraticTask":
        W = torch.randn(dim, dim, generator=generator, device=generator.device).to(device)
        y = torch.randn(dim, generator=generator, device=generator.device).to(device)
        return cls(W, y, scale=scale)

    @property
    def device(self) -> torch.device:
        return self.W.device

    def param_shapes(self) -> dict[str, torch.Size]:
        return {"theta": torch.Size([self.W.shape[1]])}

    def init(self, generator: torch.Generator) -> Params:
        theta = torch.randn(self.W.shape[1], generator=generator, device=generator.device)
        return {"theta": theta.to(self.device, self.W.dtype)}

    def sample_batch(self, generator: torch.Generator, split: str = "train", batch_size: int | None = None) -> Batch:
        empty = torch.empty(0, device=self.device)
        return Batch(empty, empty)

    def loss(self, params: Params, batch: Batch, buffers: Params | None = None) -> Tensor:
        residual = self.W @ params["theta"] - self.y
        loss = (residual * residual).sum()
        return loss if self.scale == 1.0 else self.scale * loss

    @torch.no_grad()
    def evaluate(self, params: Params, split: str = "test", buffers: Params | None = None) -> dict[str, float]:
        return {"loss": float(self.loss(params, self.sample_batch(torch.Generator())))}

    def minimum(self) -> float:
        """The exact minimum value (least squares), for tests."""
        theta = torch.linalg.lstsq(self.W, self.y.unsqueeze(-1)).solution.squeeze(-1)
        return float(self.loss({"theta": theta}, self.sample_batch(torch.Generator())))


def sine_noise_std(small_noise: bool) -> float:
    """HyperAdam's noise levels: N(0, 0.1) for the baseline task and N(0, 0.01) for "small noise" (std)."""
    return 0.01 if small_noise else 0.1


def image_size_of(data: ImageDataset) -> tuple[int, int]:
    c, h, w = data.input_shape
    return c, h


def flat_features(data: ImageDataset) -> int:
    return math.prod(data.input_shape)
