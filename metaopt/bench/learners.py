"""The learners and optimizers the sections time, and the check of a fast variant against the reference."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import meta_tasks
import metaopt
from meta_tasks import models
from meta_tasks.datasets import DatasetNotFoundError
from metaopt.bench.config import FRESH_LEARNED, VARIANT_CHECK_STEPS, VARIANT_RTOL
from metaopt.bench.memory import HAND_DESIGNED_BYTES, ByteModel
from metaopt.bench.timing import GRAD_SCALE
from metaopt.learned import LEARNED_NAMES


TORCH_ADAM = ("torch-adam-foreach", "torch-adam-fused")  # fused only on CUDA
ADAM_REFERENCE = "torch-adam-foreach"  # "Adam's iteration": torch.optim.Adam as it runs by default on CUDA

# The optimizer each hypergradient method adapts the learning rate of (registered defaults: TLR's momentum is 0,
# MARTHE / RTHO / HD-val run on heavy-ball momentum). "Their base's iteration" is this optimizer's, through the same
# metaopt face.
BASE_OPTIMIZER: dict[str, str] = {
    "sgd-hd": "sgd", "sgdn-hd": "nesterov", "adam-hd": "adam",
    "cam-hd-sgd": "sgd", "cam-hd-sgdn": "nesterov", "cam-hd-adam": "adam",
    "tlr": "sgd", "tlr-pl": "sgd", "tlr-naive": "sgd",
    "marthe": "momentum", "rtho": "momentum", "hd-val": "momentum",
}


@dataclasses.dataclass(frozen=True)
class Learner:
    """A learner of the benchmarks: how to build it (module, where its shapes came from) and its input geometry."""

    name: str
    build: Callable[[], tuple[nn.Module, str]]
    input_shape: tuple[int, int, int]
    num_classes: int = 10


def _task_learner(task: str, fallback: Callable[[], nn.Module], fallback_text: str,
                  **options: Any) -> Callable[[], tuple[nn.Module, str]]:
    """The learner of ``get_task(task)`` (Fashion-MNIST geometry); without the dataset, the same module built
    directly, so the step section needs no data."""

    def build() -> tuple[nn.Module, str]:
        args = ", ".join([repr(task)] + [f"{k}={v!r}" for k, v in options.items()])
        try:
            return copy.deepcopy(meta_tasks.get_task(task, **options).learner), f"meta_tasks.get_task({args}).learner"
        except DatasetNotFoundError:
            return fallback(), f"{fallback_text} (Fashion-MNIST not found: the same module as get_task({args}))"

    return build


LEARNERS: dict[str, Learner] = {
    "mlp-9x20": Learner("mlp-9x20", _task_learner("mlp-deep", lambda: models.MLP(784, 20, 9, 10, "sigmoid"),
                                                  "meta_tasks.models.MLP(784, 20, 9, 10, 'sigmoid')", depth=9),
                        (1, 28, 28)),
    "cnn-2": Learner("cnn-2", _task_learner("cnn-2", lambda: models.CNN2(1, 28, 10),
                                            "meta_tasks.models.CNN2(1, 28, 10)"), (1, 28, 28)),
    "resnet18": Learner("resnet18", lambda: (models.resnet18(10, 3), "meta_tasks.models.resnet18(10, 3)"),
                        (3, 32, 32)),
}


def optimizer_names(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The optimizers to benchmark on ``device``, and the registered ones left out with the reason."""
    learned = list(FRESH_LEARNED)
    hand = [n for n in metaopt.OPTIMIZERS if n not in LEARNED_NAMES]
    skipped = {n: "learned optimizer without a fresh-instance recipe here (needs a checkpoint)"
               for n in metaopt.OPTIMIZERS if n in LEARNED_NAMES and n not in FRESH_LEARNED}
    torch_adam = [ADAM_REFERENCE] + (["torch-adam-fused"] if device.type == "cuda" else [])
    return learned + hand + torch_adam, skipped


def _kind(name: str) -> str:
    if name in FRESH_LEARNED:
        return "learned (fresh θ, frozen)"
    return "torch.optim" if name in TORCH_ADAM else "hand-designed"


def build_optimizer(name: str, named_params: list[tuple[str, nn.Parameter]]) -> tuple[torch.optim.Optimizer,
                                                                                       ByteModel | None]:
    """The hand-designed or ``torch.optim`` optimizer ``name`` over ``named_params`` at its defaults, and its byte
    model (None if it has none). Learned optimizers are built per variant by :meth:`Bench.learned_face`."""
    if name in TORCH_ADAM:
        params = [p for _, p in named_params]
        opt = torch.optim.Adam(params, fused=True) if name == "torch-adam-fused" else torch.optim.Adam(params,
                                                                                                        foreach=True)
        return opt, HAND_DESIGNED_BYTES[name]
    return metaopt.make_optimizer(name, named_params), HAND_DESIGNED_BYTES.get(name)


class VariantMismatchError(RuntimeError):
    """A fast variant of a learned optimizer's face disagrees with its reference path: the benchmark stops."""


def _relative(diff: float, scale: float) -> float:
    return 0.0 if diff == 0 else (diff / scale if scale > 0 else math.inf)


@torch.no_grad()
def compare_with_reference(opt: torch.optim.Optimizer, model: nn.Module, reference: torch.optim.Optimizer,
                           reference_model: nn.Module, generator: torch.Generator, label: str,
                           steps: int = VARIANT_CHECK_STEPS, rtol: float = VARIANT_RTOL) -> dict[str, Any]:
    """Step ``opt`` (a fast variant over ``model``) and ``reference`` (the reference face over ``reference_model``,
    a copy of ``model`` with the same weights) ``steps`` times on the same random gradients (N(0, GRAD_SCALE²)),
    and compare.

    Returns the largest absolute differences of the parameters and of the state, and the largest relative one
    (per tensor: to the largest entry of the reference's state field, or to how far the reference moved the
    parameter). Raises :class:`VariantMismatchError`, naming ``label`` and the tensor, when that exceeds ``rtol``.
    """
    params, ref_params = list(model.parameters()), list(reference_model.parameters())
    initial = [q.detach().clone() for q in ref_params]
    device = params[0].device
    for _ in range(steps):
        for p, q in zip(params, ref_params):
            p.grad = q.grad = torch.randn(p.shape, generator=generator, device=device) * GRAD_SCALE
        opt.step()
        reference.step()
    worst: tuple[float, str] = (0.0, "")
    abs_params = abs_state = 0.0
    for i, (p, q, q0) in enumerate(zip(params, ref_params, initial)):
        diff = float((p - q).abs().max())
        abs_params = max(abs_params, diff)
        worst = max(worst, (_relative(diff, float((q - q0).abs().max())), f"parameter {i}"))
        for field, value in reference.state[q].items():
            diff = float((opt.state[p][field] - value).abs().max())
            abs_state = max(abs_state, diff)
            worst = max(worst, (_relative(diff, float(value.abs().max())), f"state {field!r} of parameter {i}"))
    for p in params:
        p.grad = None
    if worst[0] > rtol:
        raise VariantMismatchError(
            f"{label}: after {steps} steps the {worst[1]} differs from the reference path by {worst[0]:.3g} of its "
            f"scale (tolerance {rtol:g}); a fast path that disagrees with the reference is not timed")
    return {"steps": steps, "max_abs_diff_params": abs_params, "max_abs_diff_state": abs_state,
            "max_rel_diff": worst[0], "rtol": rtol}


def _stored_state_floats(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Floats of per-coordinate state ``opt`` holds for ``params`` (0-d tensors such as step counters left out)."""
    return sum(v.numel() for p in params for v in opt.state.get(p, {}).values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _random_batch(learner: Learner, batch_size: int, generator: torch.Generator,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(batch_size, *learner.input_shape, generator=generator, device=device)
    y = torch.randint(learner.num_classes, (batch_size,), generator=generator, device=device)
    return x, y


def _release(device: torch.device) -> None:
    """Return a finished case's memory before the next one (CUDA: collect cycles and empty torch's cache, so that one
    large case does not leave the next short of memory; on the CPU reference counting suffices and a full collection
    per case would dominate a quick run)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _guard(row: dict[str, Any], device: torch.device, case: Callable[..., dict[str, Any]],
           *args: Any) -> dict[str, Any]:
    """``row`` updated with ``case(*args)``; a CUDA out-of-memory error is recorded in the row instead and the run goes
    on to the next case. So is any error of a fast variant of a learned face (a Triton kernel or a torch.compile graph
    that fails to build on this machine): its row says why, and the other variants are still measured. A variant that
    disagrees with the reference (:class:`VariantMismatchError`) and every other error propagate."""
    try:
        row.update(case(*args))
    except torch.cuda.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
    except VariantMismatchError:
        raise
    except Exception as err:  # noqa: BLE001 - recorded, see the docstring
        if row.get("variant") in (None, "reference"):
            raise
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    _release(device)
    return row

