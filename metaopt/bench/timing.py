"""What the benchmark's sections share: the median, quartiles and spread of repeated calls (timed with CUDA events on a
GPU and ``time.perf_counter`` on a CPU), how a time is printed, and the calls they time: ``opt.step`` on fixed random
gradients of scale :data:`GRAD_SCALE`, or ``opt.step(closure)`` (:func:`closure_step`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.core import step_needs

GRAD_SCALE = 1e-2  # the random, fixed gradients of the step sections: N(0, 1e-4)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted data by linear interpolation between order statistics (numpy.percentile's default,
    statistics.quantiles(method="inclusive"))."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, quartiles and interquartile range of timing samples in seconds, and their number ``n``."""
    if not samples:
        raise ValueError("summarize needs at least one sample")
    ordered = sorted(float(s) for s in samples)
    q1, median, q3 = (_quantile(ordered, q) for q in (0.25, 0.5, 0.75))
    return {"median_s": median, "min_s": ordered[0], "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "n": len(ordered)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int,
            flush: torch.Tensor | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (method: module docstring).

    ``flush`` (CUDA): a buffer overwritten before each timed call, outside the timed region, to evict the L2 cache.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            if flush is not None:
                flush.zero_()
            # Idle GPU at the start event: queued work would otherwise hide the host's launch time of fn.
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return samples


def format_seconds(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def closure_step(opt: torch.optim.Optimizer, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 val_batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], Any]:
    """One ``opt.step(closure)`` on ``batch`` for an optimizer that takes a closure (with a validation closure on
    ``val_batch`` where it accepts one, as ``metaopt.evaluate`` gives it)."""

    def closure() -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    kwargs = {}
    if step_needs(opt)[1]:
        kwargs["val_closure"] = lambda: F.cross_entropy(model(val_batch[0]), val_batch[1])
    return lambda: opt.step(closure, **kwargs)
