"""Tasks and task families: what an optimizer optimizes.

A :class:`Task` is a learner (an ``nn.Module`` used statelessly through ``torch.func.functional_call``), its data and
its loss. Every random choice comes from a ``torch.Generator`` passed in, so a task is deterministic given its
generator, and two optimizers given the same seeds see identical initial weights and identical batches::

    params = task.init(generator)                      # dict[str, Tensor], fresh tensors
    batch = task.sample_batch(generator)               # Batch(x, y, seed)
    loss = task.loss(params, batch)                    # scalar tensor, differentiable w.r.t. params
    metrics = task.evaluate(params, "test")            # {"loss": ..., "top1": ..., "top2": ...}

A :class:`TaskFamily` samples task configurations (and the per-instance random draws of the training tricks in
:mod:`meta_tasks.tricks`); meta-training draws a fresh task from its family whenever an instance reaches its horizon.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]


class Batch(NamedTuple):
    """One minibatch. ``seed`` (drawn from the task's generator) seeds the learner's own randomness (dropout) so that
    a loss evaluation is reproducible; it is None for learners without randomness."""

    x: Tensor
    y: Tensor
    seed: int | None = None


class Task(abc.ABC):
    """A learner, its data and its loss. Subclasses implement :meth:`init`, :meth:`sample_batch` and :meth:`loss`."""

    name: str = "task"

    @abc.abstractmethod
    def init(self, generator: torch.Generator) -> Params:
        """Fresh initial parameters drawn from ``generator`` (new tensors on :attr:`device`)."""

    @abc.abstractmethod
    def sample_batch(self, generator: torch.Generator, split: str = "train", batch_size: int | None = None) -> Batch:
        """A minibatch of ``split`` drawn with ``generator`` (default size: the task's batch size)."""

    @abc.abstractmethod
    def loss(self, params: Params, batch: Batch, buffers: Params | None = None) -> Tensor:
        """Scalar training loss of ``params`` on ``batch``. ``buffers`` (BatchNorm running statistics) are updated
        in place when given; when None the task uses scratch copies, so a call never changes the task."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """Where the task's data and parameters live."""

    @abc.abstractmethod
    def param_shapes(self) -> dict[str, torch.Size]:
        """The shape of every parameter, in the order of :meth:`init`'s dict."""

    def init_buffers(self) -> Params:
        """Fresh buffers (BatchNorm running statistics) for :meth:`loss` and :meth:`evaluate`; empty if none."""
        return {}

    def draws(self) -> Params:
        """This instance's own random draws as named tensors (the training tricks' scales and targets; none for a
        plain task). Instances of one configuration differ only in these, their initialization and their batches,
        so a meta-batch of them is vectorized by stacking their draws and calling :meth:`loss_with` under vmap."""
        return {}

    def loss_with(self, params: Params, batch: Batch, draws: Params, buffers: Params | None = None) -> Tensor:
        """:meth:`loss` with the instance draws passed in explicitly (shaped like :meth:`draws`)."""
        return self.loss(params, batch, buffers)

    def base(self) -> "Task":
        """The task configuration underneath any per-instance wrappers (instances sharing it can be batched)."""
        return self

    @abc.abstractmethod
    def evaluate(self, params: Params, split: str = "test", buffers: Params | None = None) -> dict[str, float]:
        """Loss (and top-1 / top-2 accuracy for classification) of ``params`` on a whole split, in evaluation mode."""

    def num_params(self) -> int:
        return sum(s.numel() for s in self.param_shapes().values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.num_params()} parameters, device={self.device})"


class TaskFamily(abc.ABC):
    """A distribution over task configurations: :meth:`sample` draws one with the given generator."""

    name: str = "family"

    @abc.abstractmethod
    def sample(self, generator: torch.Generator) -> Task:
        """One task configuration (plus its per-instance random draws), drawn from ``generator``."""


class FixedFamily(TaskFamily):
    """The family of a single task configuration: instances differ only in initialization and batches."""

    def __init__(self, task: Task):
        self.task = task
        self.name = task.name

    def sample(self, generator: torch.Generator) -> Task:
        return self.task


class ChoiceFamily(TaskFamily):
    """A uniform choice among task factories (built lazily, once each), e.g. MLPs with different activations."""

    def __init__(self, name: str, factories: Sequence[Callable[[], Task]]):
        if not factories:
            raise ValueError("ChoiceFamily needs at least one task factory")
        self.name = name
        self._factories = list(factories)
        self._built: dict[int, Task] = {}

    def sample(self, generator: torch.Generator) -> Task:
        i = int(torch.randint(len(self._factories), (), generator=generator))
        if i not in self._built:
            self._built[i] = self._factories[i]()
        return self._built[i]


class TransformedFamily(TaskFamily):
    """Applies a per-instance transform (for example the training tricks) to every task a family samples."""

    def __init__(self, family: TaskFamily, transform: Callable[[Task, torch.Generator], Task], name: str | None = None):
        self.family, self.transform = family, transform
        self.name = name or family.name

    def sample(self, generator: torch.Generator) -> Task:
        return self.transform(self.family.sample(generator), generator)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the learner's own randomness (dropout) from ``seed`` without touching the caller's global RNG state."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put ``module`` in evaluation mode (BatchNorm running stats, no dropout)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def call_learner(learner: nn.Module, params: Params, buffers: Params | None, x: Tensor) -> Tensor:
    """``learner(x)`` with the given parameters and buffers (``torch.func.functional_call``)."""
    if buffers:
        return functional_call(learner, (params, buffers), (x,))
    return functional_call(learner, params, (x,))
