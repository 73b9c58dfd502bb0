"""What a benchmark run measures: its sections, the learned variants, and :class:`BenchConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from metaopt.learned import DMOptimizer, HyperAdam, LearnedOptimizer, RNNprop


SECTIONS: tuple[str, ...] = ("faces", "step", "iteration", "meta", "table1")


# The learned optimizers, fresh (no checkpoints are committed): θ at its initialization, used frozen.
FRESH_LEARNED: dict[str, Callable[[], LearnedOptimizer]] = {
    "hyperadam": lambda: HyperAdam(num_candidates=20),
    "dm": DMOptimizer,
    "rnnprop": RNNprop,
}
# The variants of a learned optimizer's frozen face that the step and iteration sections time, as keyword arguments of
# ``LearnedOptimizer.frozen``; CUDA graphs and the compiled Triton kernels need a CUDA device.
LEARNED_VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {"fast": False},
    "flat": {"fast": True, "compile": False},
    "compiled": {"fast": True, "compile": True},
    "compiled-cudagraphs": {"fast": True, "compile": "reduce-overhead"},
    "triton": {"fast": True, "kernel": True},
}
CUDA_VARIANTS = frozenset({"compiled-cudagraphs", "triton"})  # (the kernels run on a CPU only when interpreted)
QUICK_VARIANTS = ("reference", "flat")  # compiling would take longer than the rest of a quick run (module docstring)
VARIANT_CHECK_STEPS = 3
# How far a fast variant may be from the reference after VARIANT_CHECK_STEPS steps, per tensor, relative to the
# largest entry of the reference's state field or to how far the reference moved the parameter. The eager flat path
# is the reference bit for bit (tests/test_learned_fast.py); compiled kernels round differently (reordered reductions,
# other exp / tanh code): measured up to 3e-6 in float32 (HyperAdam J = 20 on MLP-9×20, CPU inductor). 1e-4 leaves a
# margin of 30 for longer reductions (ResNet-18) and still stops a wrong fast path, whose errors are O(1e-2) and up.
VARIANT_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure and how often; every field is a ``python -m metaopt.bench`` flag. ``None`` counts take the
    full-run default, or the quick one with ``quick``."""

    device: str = "auto"
    quick: bool = False
    sections: tuple[str, ...] = SECTIONS
    repeats: int | None = None
    warmup: int | None = None
    table1_seeds: int | None = None
    table1_repeats: int = 1
    threads: int | None = None
    seed: int = 0
    variants: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"Invalid sections: {list(self.sections)} (expected some of {', '.join(SECTIONS)})")
        if self.variants is not None and (not self.variants or any(v not in LEARNED_VARIANTS for v in self.variants)):
            raise ValueError(f"Invalid variants: {list(self.variants)} (expected some of "
                             f"{', '.join(LEARNED_VARIANTS)})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"Invalid device: {self.device!r} (expected auto, cpu or cuda)")
        for name in ("repeats", "table1_seeds", "table1_repeats", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Invalid {name}: {value} (expected >= 1)")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"Invalid warmup: {self.warmup} (expected >= 0)")

    # Sizes: the for a full run, toy ones for --quick.
    @property
    def num_repeats(self) -> int:
        return self.repeats if self.repeats is not None else (2 if self.quick else 20)

    @property
    def num_warmup(self) -> int:
        return self.warmup if self.warmup is not None else (1 if self.quick else 3)

    @property
    def num_threads(self) -> int | None:
        """CPU threads for torch (None: torch's default). Quick mode uses 1: CI machines are small and shared, and
        two intra-op threads contending for a busy 2-core machine made a 0.5 ms Adam step take 80 ms (measured)."""
        return self.threads if self.threads is not None else (1 if self.quick else None)

    @property
    def learned_variants(self) -> tuple[str, ...]:
        """The frozen-face variants timed for each learned optimizer (CUDA-only ones are dropped on a CPU)."""
        if self.variants is not None:
            return self.variants
        return QUICK_VARIANTS if self.quick else tuple(LEARNED_VARIANTS)

    @property
    def learners(self) -> tuple[str, ...]:
        return ("mlp-9x20",) if self.quick else ("mlp-9x20", "cnn-2", "resnet18")

    @property
    def iteration_model(self) -> str:
        return "mlp-9x20" if self.quick else "resnet18"

    @property
    def batch_size(self) -> int:
        return 32 if self.quick else 128

    def meta_batches(self, device: torch.device) -> tuple[int, ...]:
        if self.quick:
            return (1, 2)
        return (1, 8, 32, 128) if device.type == "cuda" else (1, 2, 8)

    @property
    def meta_overrides(self) -> dict[str, int]:
        """Preset overrides: quick mode shortens the truncations (5 steps, horizon 10) so a meta-step takes well under a
        second, and runs the fused cell eagerly (compiling it takes longer than the rest of a quick run)."""
        return dict(truncation=5, horizon=10, compile=False) if self.quick else {}

    @property
    def memory_meta_batch(self) -> int:
        return 1 if self.quick else 8

    @property
    def memory_truncations(self) -> int:
        return 3 if self.quick else 10  # 10 = two horizons of the preset: slots are reset along the way

    @property
    def num_table1_seeds(self) -> int:
        return self.table1_seeds if self.table1_seeds is not None else (2 if self.quick else 100)

    @property
    def table1_steps(self) -> int | None:
        return 5 if self.quick else None  # None: the suite's 100

    @property
    def bandwidth_bytes(self) -> int:
        return (64 if self.quick else 1024) * 2**20

    def settings(self) -> dict[str, Any]:
        return {"quick": self.quick, "sections": list(self.sections), "repeats": self.num_repeats,
                "warmup": self.num_warmup, "learners": list(self.learners), "batch_size": self.batch_size,
                "meta_overrides": self.meta_overrides,
                "iteration_model": self.iteration_model, "table1_seeds": self.num_table1_seeds,
                "table1_repeats": self.table1_repeats, "threads": self.num_threads, "seed": self.seed,
                "variants": list(self.learned_variants), "variant_rtol": VARIANT_RTOL, "dtype": "float32"}

