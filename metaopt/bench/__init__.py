"""Performance benchmarks: optimizer step time against the memory roofline, training iterations, meta-training
throughput and memory, and the wall time of the HyperAdam Table 1 suite.

This module owns ``python -m metaopt.bench`` (the issue "Performance"), the measurement method, the per-optimizer
byte model behind the roofline, the issue's targets and anchors, and the Markdown table the README shows::

    python -m metaopt.bench --out bench.json                 # everything, on CUDA when there is one
    python -m metaopt.bench --quick --device cpu             # tiny sizes, seconds on a CPU (CI)
    python -m metaopt.bench --only step,meta --repeats 50    # some sections
    python -m metaopt.bench --render bench.json              # the Markdown table of an earlier run

Sections (``--only``):

* ``faces`` — each registered optimizer's step as a user builds it (``make_optimizer``, defaults) against its
  ``torch.optim`` counterpart, its base optimizer, an SGD training iteration or its compute floor, timed side by side
  on two MLPs, with the speed issue's targets (:mod:`metaopt.bench.faces`).
* ``step`` — one optimizer step (``opt.step()`` with random, fixed gradients) of HyperAdam (J = 20), DMoptimizer and
  RNNprop with fresh, frozen θ, of every hand-designed optimizer in ``metaopt.OPTIMIZERS`` and of ``torch.optim.Adam``
  (foreach; fused on CUDA), on the parameters of MLP-9×20, CNN-2 and ResNet-18, next to the memory roofline
  (:class:`ByteModel` bytes / measured copy bandwidth). Optimizers that take a closure (MARTHE, RTHO, HD-val,
  TLR-naive) are timed for a whole ``opt.step(closure)``, their forward and backward passes included, and have no
  roofline.
* ``iteration`` — forward + backward + step on ResNet-18, batch 128 of random 32×32×3 inputs, with every optimizer,
  as a ratio to ``torch.optim.Adam`` (foreach) and, for the hypergradient methods, to their base optimizer.
* ``meta`` — meta-training throughput (inner steps/s = meta-batch K × truncation length / seconds per meta-step) and
  peak memory of the ``hyperadam-paper`` preset (``MetaTrainer.meta_step_once``; its default path: the fused,
  compiled cell of :mod:`metaopt.learned.fused`) for K = 1, 8, 32, 128 on CUDA and K = 1, 2, 8 on a CPU; at K = 2
  also the reference path (``fused=False``: autograd through the vmapped ``update``) and the ``dm-paper`` and
  ``rnnprop-paper`` presets, each on its default path (batched, compiled) and its reference path (``fused=False,
  compile=False``), so their speed-up is measured on one machine on one day; the peak memory of the first and the
  last of N truncations (it must stay flat). Memory rows carry the resident memory of the process once the trainer
  was built (data, learners, θ: "the task") and the peak above it.
* ``table1`` — the seconds ``evaluate_suite`` takes for ``hyperadam-table1`` at 100 seeds: the suite's optimizers at
  their rates (no tuning), the learned ones (HyperAdam, and DMoptimizer / RNNprop where the suite lists them) as fresh
  instances passed through ``sources=``.

In the ``step`` and ``iteration`` sections, learned optimizers are timed in each variant of their frozen face
(:data:`LEARNED_VARIANTS`, ``--variants``), one row each, named ``hyperadam[flat]``: ``reference`` (``fast=False``,
the functional update on dicts), ``flat`` (the flat-state fast path, eager), ``compiled`` (``compile=True``) and, on
CUDA, ``compiled-cudagraphs`` (``compile="reduce-overhead"``) and ``triton`` (``kernel=True``: one fused Triton kernel
per step, :mod:`metaopt.learned.kernels`). Before a fast variant is timed it runs 3 steps next to
the reference on the same gradients; the largest differences of parameters and state are recorded in the row
(``check``) and a difference beyond :data:`VARIANT_RTOL` stops the run (:class:`VariantMismatchError`): a fast path
that is wrong is not timed. The issue's targets for a learned optimizer judge its best variant (``variant`` in the
judged target).

Method: every timing is the median, with min and interquartile range, of ``--repeats`` timed calls after ``--warmup``
untimed ones. On CUDA each call is timed with CUDA events after a
``torch.cuda.synchronize()``, so the GPU starts idle and the host's launch overhead counts as an eager user sees it,
and after overwriting a 256 MiB buffer, so that a state that fits in L2 is not timed from the cache (as
``triton.testing.do_bench``). On the CPU ``time.perf_counter`` brackets each call. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set on the CPU (see :class:`PeakMemory`).
Everything is float32 with PyTorch's default backend settings, and eager but for the compiled variants, which are
compiled by their first (untimed) steps.

``--quick`` runs every section at toy sizes (MLP-9×20 only, also for the iteration, batch 32; K ∈ {1, 2} with 5-step
truncations; 2 seeds × 5 steps; one CPU thread; the ``reference`` and ``flat`` variants only, since compiling the
three learned optimizers costs 20–30 s of a CPU with a cold inductor cache, more than the rest of the quick run) in
seconds on a CPU; CI runs it. Targets are judged (``passed``) only on CUDA; on a CPU they are listed, not judged. A
full run on one GPU takes several minutes per section (``wall_s`` in the report; the table1 section is the longest):
run sections separately with ``--only`` under a time limit. A CUDA out-of-memory error in one case is recorded in its
row and the run goes on; a missing Fashion-MNIST marks the meta and table1 sections skipped.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import meta_tasks
import metaopt
from meta_tasks import models
from meta_tasks.datasets import DatasetNotFoundError
from metaopt.bench.faces import faces_markdown, faces_section
from metaopt.bench.timing import GRAD_SCALE, closure_step, format_seconds, measure, summarize, synchronize
from metaopt.core import step_needs
from metaopt.environment import device_name
from metaopt.evaluate import SUITES, evaluate_suite
from metaopt.learned import LEARNED_NAMES, DMOptimizer, HyperAdam, LearnedOptimizer, RNNprop
from metaopt.meta import MetaConfig, MetaTrainer, preset
from metaopt.meta.trainer import resolve_device
from metaopt.registry import MemoryModel, records

SECTIONS: tuple[str, ...] = ("faces", "step", "iteration", "meta", "table1")
FORMAT_VERSION = 1
FLOAT_BYTES = 4  # float32
CACHE_FLUSH_BYTES = 256 * 2**20  # > 4× the L2 of an H100 / H200
REPO_ROOT = Path(__file__).resolve().parents[2]

# Numbers in a report that may legitimately be 0 (a spread, a count of floats, a seed, a warm-up count); every other
# number in a report is finite and positive.
NONNEGATIVE_FIELDS = frozenset({"iqr_s", "state_floats", "reduction_floats", "stored_state_floats", "seed", "warmup",
                                "max_abs_diff_params", "max_abs_diff_state", "max_rel_diff"})

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
    "flat": {"fast": True},
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


# ----------------------------------------------------------------------------------------------------------------------
# Memory


class PeakMemory:
    """The peak memory of a region: :meth:`reset` before it, :meth:`peak_bytes` after.

    CUDA: ``torch.cuda.max_memory_allocated`` (everything torch allocated on the device: data, θ, states, graphs).
    CPU: the process's peak resident set size (``VmHWM``), reset by writing ``5`` to ``/proc/self/clear_refs``; it
    includes the interpreter, torch and the datasets. Where that file is refused (not Linux), the lifetime peak
    ``ru_maxrss``, which a region can only raise. No psutil needed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        elif self._reset_hwm():
            self.method = "peak RSS (VmHWM, reset through /proc/self/clear_refs)"
        else:
            self.method = "lifetime peak RSS (ru_maxrss)"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("peak RSS"):
            self._reset_hwm()

    def current_bytes(self) -> int | None:
        """The memory in use now (CUDA: allocated; CPU: resident, ``VmRSS``, after returning freed heap pages to the
        system with glibc's ``malloc_trim``, so that what earlier cases freed does not count); None where it cannot
        be read."""
        gc.collect()
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
        except (OSError, AttributeError):
            return None

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method.startswith("peak RSS"):
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of ``nbytes``, counting bytes read plus bytes written."""
    src = torch.rand(nbytes // FLOAT_BYTES, device=device)  # random: zeros can copy faster than data
    dst = torch.empty_like(src)
    samples = measure(lambda: dst.copy_(src), device, repeats, warmup)
    stats = summarize(samples)
    moved = 2 * src.numel() * FLOAT_BYTES
    return {"buffer_bytes": nbytes, "bytes_moved": moved, "time_s": stats,
            "bytes_per_s": moved / stats["median_s"]}


# ----------------------------------------------------------------------------------------------------------------------
# The byte model behind the roofline


@dataclasses.dataclass(frozen=True)
class ByteModel:
    """The fewest float32 values one optimizer step must move per learner coordinate.

    A step reads each parameter and its gradient and writes the parameter (3 floats), reads and writes each of the
    ``state`` floats of per-coordinate state the algorithm needs (2 · state), and reads ``reductions`` floats in a
    pass of its own when the update needs a reduction over all coordinates first (a norm, a dot product): that pass
    cannot be fused into the update that depends on its result. So bytes per step = (3 + 2·state + reductions) ·
    num_params · 4, and the roofline is those bytes over the measured copy bandwidth. What an implementation stores
    beyond the algorithm's needs (``stored_state_floats`` in a report) is not in the model: it shows in the ratio.
    """

    state: float
    reductions: float
    basis: str

    @property
    def floats_per_coordinate(self) -> float:
        return 3 + 2 * self.state + self.reductions

    def bytes_per_step(self, num_params: int) -> float:
        return self.floats_per_coordinate * num_params * FLOAT_BYTES

    def as_dict(self) -> dict[str, Any]:
        return {"state_floats": self.state, "reduction_floats": self.reductions,
                "floats_per_coordinate": self.floats_per_coordinate, "basis": self.basis}

    @classmethod
    def from_memory_model(cls, memory: MemoryModel) -> ByteModel:
        """The byte model of a registry record's :class:`~metaopt.registry.MemoryModel` (the same numbers)."""
        return cls(memory.state, memory.reductions, memory.basis)


# The hand-designed optimizers, from their registry records (each registration states its memory model at the
# registered defaults; the records of optimizers whose step evaluates the loss itself have none), and torch.optim's
# Adam.
HAND_DESIGNED_BYTES: dict[str, ByteModel] = {
    **{entry.name: ByteModel.from_memory_model(entry.memory) for entry in records() if entry.memory is not None},
    "torch-adam-foreach": ByteModel(2, 0, "m, v"),
    "torch-adam-fused": ByteModel(2, 0, "m, v"),
}


def learned_byte_model(lopt: LearnedOptimizer) -> ByteModel | None:
    """The byte model of a coordinatewise learned optimizer at its configuration (None for other classes)."""
    if isinstance(lopt, HyperAdam):
        J, width = lopt.num_candidates, lopt.state_width
        # 6J at the defaults; the reduction pass reads g (for rms(g)) and m_{t-1} (for rms(m), J per coordinate).
        return ByteModel(2 * width + 4 * J, 1 + J,
                         f"s, c ({width} each), m, v, beta_hat, gamma_hat ({J} each); reads g and m for rms(g), rms(m)")
    if isinstance(lopt, RNNprop):
        LH = lopt.num_layers * lopt.hidden_size
        # b1_hat, b2_hat are the same for every coordinate (1 - beta^t): one number per step, not state to move.
        return ByteModel(2 * LH + 2, 0, f"h, c ({LH} each), m, v")
    if isinstance(lopt, DMOptimizer):
        LH = lopt.num_layers * lopt.hidden_size
        return ByteModel(2 * LH, 0, f"h, c ({LH} each)")
    return None


def roofline_seconds(bytes_per_step: float, bytes_per_s: float) -> float:
    """The memory roofline: the time to move ``bytes_per_step`` at the measured copy bandwidth."""
    return bytes_per_step / bytes_per_s


# ----------------------------------------------------------------------------------------------------------------------
# Targets and anchors (issue "Performance")


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal from an issue: ``metric`` (a dotted path into the row ``key``) compared with ``limit``, judged on
    reports from ``device`` ("cuda" or "cpu")."""

    key: str
    metric: str
    comparison: str  # "<=" or ">="
    limit: float
    text: str
    device: str = "cuda"


def _learned_step_targets() -> list[Target]:
    targets = []
    for name in FRESH_LEARNED:
        targets.append(Target(f"step:{name}:resnet18", "ratio_to_roofline", "<=", 2.0, "≤ 2× roofline"))
        targets.append(Target(f"step:{name}:mlp-9x20", "time_s.median_s", "<=", 1e-4, "≤ 0.1 ms"))
    return targets


TARGETS: tuple[Target, ...] = (
    *_learned_step_targets(),
    Target("iteration:hyperadam:resnet18", "ratio_to_adam", "<=", 1.8, "≤ 1.8× Adam"),
    *(Target(f"iteration:{name}:resnet18", "ratio_to_base", "<=", 1.05, "≤ 1.05× base")
      for name in ("sgd-hd", "sgdn-hd", "adam-hd", "cam-hd-sgd", "cam-hd-sgdn", "cam-hd-adam", "tlr", "tlr-pl")),
    *(Target(f"iteration:{name}:resnet18", "ratio_to_base", "<=", 3.0, "≤ 3× base") for name in ("marthe", "rtho")),
    Target("meta:K=128", "inner_steps_per_s", ">=", 20_000, "≥ 20,000 inner steps/s"),
    Target("meta:K=128", "peak_memory_bytes", "<=", 16e9, "≤ 16 GB"),
    # issue "Learned optimizers that have actually learned", on the 2-core CPU
    Target("meta:K=2", "inner_steps_per_s", ">=", 150, "≥ 150 inner steps/s (CPU)", device="cpu"),
    Target("meta:K=2", "peak_over_task_bytes", "<=", 0.5e9, "≤ 0.5 GB above the task (CPU)", device="cpu"),
    Target("table1:100-seeds", "time_s.median_s", "<=", 60.0, "≤ 60 s"),
)

ANCHORS: dict[str, Any] = {
    "source": "issue 'Performance': the eager implementation on one NVIDIA H100",
    "values": [
        {"key": "step:hyperadam[reference]:resnet18", "metric": "time_s.median_s", "value": 59e-3,
         "text": "eager HyperAdam"},
        {"key": "step:hyperadam[reference]:mlp-9x20", "metric": "time_s.median_s", "value": 16.4e-3,
         "text": "eager HyperAdam"},
        {"key": "step:torch-adam-fused:resnet18", "metric": "time_s.median_s", "value": 0.40e-3, "text": "Adam fused"},
        {"key": "step:torch-adam-fused:mlp-9x20", "metric": "time_s.median_s", "value": 0.16e-3, "text": "Adam fused"},
        {"key": "meta:K=1", "metric": "inner_steps_per_s", "value": 76, "text": "meta-training, 1 task"},
        {"key": "meta:K=32", "metric": "inner_steps_per_s", "value": 1641, "text": "meta-training, 32 tasks"},
    ],
}


def _lookup(row: dict[str, Any], metric: str) -> Any:
    value: Any = row
    for part in metric.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _rows_by_key(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {}
    for section in report.get("sections", {}).values():
        for row in section.get("rows", []):
            rows[row["key"]] = row
    return rows


def judge_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every :data:`TARGETS` entry with its measured value (None when not measured) and ``passed`` (None on a report
    from another device than the target's, and on ``--quick`` reports, whose toy sizes are other configurations).

    A target whose key names a learned optimizer (``step:hyperadam:resnet18``) is met by its best variant: the rows
    of that ``family`` (``step:hyperadam[flat]:resnet18``, ...) compete, and the judged entry names the winner's
    ``row`` and ``variant``."""
    rows = _rows_by_key(report)
    device = report["environment"]["device"]
    judged_here = not report.get("settings", {}).get("quick", False)  # toy sizes measure other configurations
    judged = []
    for target in TARGETS:
        candidates = [rows[target.key]] if target.key in rows else [r for r in rows.values()
                                                                     if r.get("family") == target.key]
        measured = [(value, row) for row in candidates if (value := _lookup(row, target.metric)) is not None]
        entry: dict[str, Any] = {**dataclasses.asdict(target), "measured": None, "passed": None}
        if measured:
            pick = min if target.comparison == "<=" else max
            value, row = pick(measured, key=lambda pair: pair[0])
            entry.update(measured=value, row=row["key"])
            if "variant" in row:
                entry["variant"] = row["variant"]
            if judged_here and device == target.device:
                entry["passed"] = value <= target.limit if target.comparison == "<=" else value >= target.limit
        judged.append(entry)
    return judged


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


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


# ----------------------------------------------------------------------------------------------------------------------
# Learners and optimizers


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


# ----------------------------------------------------------------------------------------------------------------------
# Sections


class Bench:
    """One benchmark run on one device: the sections share the timing settings, the measured bandwidth and, on CUDA,
    the buffer that evicts L2 between timed calls of the step and iteration sections."""

    def __init__(self, config: BenchConfig, device: torch.device, log: Callable[[str], None] = lambda s: None):
        self.config, self.device, self.log = config, device, log
        self.repeats, self.warmup = config.num_repeats, config.num_warmup
        self.names, self.skipped = optimizer_names(device)
        self.variants = [v for v in config.learned_variants if device.type == "cuda" or v not in CUDA_VARIANTS]
        for variant in config.learned_variants:
            if variant not in self.variants:
                self.skipped.update({f"{name}[{variant}]": "needs a CUDA device"
                                     for name in self.names if name in FRESH_LEARNED})
        self.bandwidth: dict[str, Any] | None = None
        self._flush: torch.Tensor | None = None

    def time(self, fn: Callable[[], Any], repeats: int | None = None, warmup: int | None = None,
             flush_cache: bool = True) -> dict[str, float]:
        """:func:`measure` with this run's settings; ``flush_cache`` evicts L2 before each call on CUDA."""
        flush = None
        if flush_cache and self.device.type == "cuda":
            if self._flush is None:
                self._flush = torch.empty(CACHE_FLUSH_BYTES, dtype=torch.uint8, device=self.device)
            flush = self._flush
        return summarize(measure(fn, self.device, self.repeats if repeats is None else repeats,
                                 self.warmup if warmup is None else warmup, flush))

    def drop_flush_buffer(self) -> None:
        self._flush = None
        _release(self.device)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.config.seed + offset)

    def cases(self) -> list[tuple[str, str, str | None]]:
        """(row name, optimizer, variant) of each timed case: a learned optimizer once per face variant, as
        ``hyperadam[flat]``; the others once, with variant None."""
        cases: list[tuple[str, str, str | None]] = []
        for name in self.names:
            if name in FRESH_LEARNED:
                cases += [(f"{name}[{variant}]", name, variant) for variant in self.variants]
            else:
                cases.append((name, name, None))
        return cases

    def learned_face(self, name: str, variant: str, model: nn.Module, check_offset: int
                     ) -> tuple[torch.optim.Optimizer, LearnedOptimizer, dict[str, Any]]:
        """A fresh learned optimizer ``name`` frozen over ``model`` in ``variant``, and what the row records about it:
        its variant and, for a fast variant, its :func:`compare_with_reference` check (3 steps already taken; the
        weights are restored afterwards, so every case still starts from the same ones)."""
        lopt = FRESH_LEARNED[name]()
        named = list(model.named_parameters())
        opt = lopt.frozen(named, **LEARNED_VARIANTS[variant])
        record: dict[str, Any] = {"learned": name, "variant": variant}
        if variant != "reference":
            weights = copy.deepcopy(model.state_dict())
            reference_model = copy.deepcopy(model)
            reference = lopt.frozen(list(reference_model.named_parameters()), **LEARNED_VARIANTS["reference"])
            record["check"] = compare_with_reference(opt, model, reference, reference_model,
                                                     self.generator(check_offset), f"{name}[{variant}]")
            del reference, reference_model
            model.load_state_dict(weights)
            _release(self.device)
        return opt, lopt, record

    # -- bandwidth -------------------------------------------------------------------------------------------------

    def measure_bandwidth(self) -> dict[str, Any]:
        self.log("bandwidth: device-to-device copy")
        self.bandwidth = copy_bandwidth(self.device, self.config.bandwidth_bytes, max(self.repeats, 5), self.warmup)
        return self.bandwidth

    # -- 1. frozen step against the roofline -----------------------------------------------------------------------

    def step_section(self) -> dict[str, Any]:
        bandwidth = self.bandwidth or self.measure_bandwidth()
        learners, rows = {}, []
        for learner_name in self.config.learners:
            learner = LEARNERS[learner_name]
            base, source = learner.build()
            num_params = sum(p.numel() for p in base.parameters())
            learners[learner_name] = {"num_params": num_params, "num_tensors": len(list(base.parameters())),
                                      "source": source}
            for row_name, name, variant in self.cases():
                self.log(f"step: {row_name} on {learner_name}")
                row = {"key": f"step:{row_name}:{learner_name}", "optimizer": row_name, "learner": learner_name,
                       "kind": _kind(name), "num_params": num_params}
                if variant is not None:
                    row.update(family=f"step:{name}:{learner_name}", variant=variant)
                rows.append(_guard(row, self.device, self._step_case, name, variant, learner, base, num_params,
                                   bandwidth["bytes_per_s"]))
            del base
            _release(self.device)
        return {"learners": learners, "grad_scale": GRAD_SCALE, "rows": rows}

    def _step_case(self, name: str, variant: str | None, learner: Learner, base: nn.Module, num_params: int,
                   bytes_per_s: float) -> dict[str, Any]:
        model = copy.deepcopy(base).to(self.device)
        named = list(model.named_parameters())
        result: dict[str, Any] = {}
        if variant is None:
            opt, byte_model = build_optimizer(name, named)
        else:
            opt, lopt, result = self.learned_face(name, variant, model, check_offset=5)
            byte_model = learned_byte_model(lopt)
        closure = step_needs(opt)[0]
        if closure:
            gen = self.generator(1)
            step = closure_step(opt, model, _random_batch(learner, self.config.batch_size, gen, self.device),
                            _random_batch(learner, self.config.batch_size, gen, self.device))
        else:
            gen = self.generator(2)  # the same gradients for every optimizer
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=gen, device=self.device) * GRAD_SCALE
            step = opt.step
        stats = self.time(step)
        result.update(includes_closure=closure, time_s=stats,
                      stored_state_floats=_stored_state_floats(opt, [p for _, p in named]) / num_params)
        if closure:
            result["note"] = "whole opt.step(closure): forward/backward passes included, so no memory roofline"
        elif byte_model is not None:
            nbytes = byte_model.bytes_per_step(num_params)
            roofline = roofline_seconds(nbytes, bytes_per_s)
            result.update(byte_model=byte_model.as_dict(), bytes_per_step=nbytes, roofline_s=roofline,
                          ratio_to_roofline=stats["median_s"] / roofline)
        else:
            result["note"] = "no byte model declared for this optimizer"
        return result

    # -- 2. training iteration -------------------------------------------------------------------------------------

    def iteration_section(self) -> dict[str, Any]:
        learner = LEARNERS[self.config.iteration_model]
        base, source = learner.build()
        base = base.to(self.device)
        batch = _random_batch(learner, self.config.batch_size, self.generator(3), self.device)
        val_batch = _random_batch(learner, self.config.batch_size, self.generator(4), self.device)
        rows = []
        for row_name, name, variant in self.cases():
            self.log(f"iteration: {row_name} on {learner.name}")
            row = {"key": f"iteration:{row_name}:{learner.name}", "optimizer": row_name, "model": learner.name,
                   "kind": _kind(name)}
            if variant is not None:
                row.update(family=f"iteration:{name}:{learner.name}", variant=variant)
            rows.append(_guard(row, self.device, self._iteration_case, name, variant, base, batch, val_batch))
        medians = {r["optimizer"]: r["time_s"]["median_s"] for r in rows if "time_s" in r}
        for row in rows:
            if row["optimizer"] not in medians:
                continue
            if ADAM_REFERENCE in medians:
                row["ratio_to_adam"] = medians[row["optimizer"]] / medians[ADAM_REFERENCE]
            base_name = BASE_OPTIMIZER.get(row["optimizer"])
            if base_name in medians:
                row["base"] = base_name
                row["ratio_to_base"] = medians[row["optimizer"]] / medians[base_name]
        del base
        _release(self.device)
        return {"model": learner.name, "source": source, "batch_size": self.config.batch_size,
                "input_shape": list(learner.input_shape), "adam_reference": ADAM_REFERENCE, "rows": rows}

    def _iteration_case(self, name: str, variant: str | None, base: nn.Module,
                        batch: tuple[torch.Tensor, torch.Tensor],
                        val_batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        model = copy.deepcopy(base)  # every optimizer starts from the same weights
        result: dict[str, Any] = {}
        if variant is None:
            opt, _ = build_optimizer(name, list(model.named_parameters()))
        else:
            opt, _, result = self.learned_face(name, variant, model, check_offset=6)
        closure = step_needs(opt)[0]
        if closure:
            step = closure_step(opt, model, batch, val_batch)
        else:
            def step() -> None:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(batch[0]), batch[1]).backward()
                opt.step()
        return {**result, "includes_closure": closure, "time_s": self.time(step)}

    # -- 3. meta-training ------------------------------------------------------------------------------------------

    def meta_section(self) -> dict[str, Any]:
        # A meta-step moves far more than L2 holds, and the peak must not count the benchmark's own flush buffer.
        self.drop_flush_buffer()
        peak = PeakMemory(self.device)
        rows = []
        overrides = dict(seed=self.config.seed, **self.config.meta_overrides)
        cases = [(f"meta:K={k}", "hyperadam-paper", dict(meta_batch=k)) for k in self.config.meta_batches(self.device)]
        if self.device.type == "cpu" or self.config.quick:
            cases += [("meta:K=2[reference]", "hyperadam-paper", dict(meta_batch=2, fused=False)),
                      ("meta:dm-paper:K=2", "dm-paper", dict(meta_batch=2)),
                      ("meta:dm-paper:K=2[reference]", "dm-paper", dict(meta_batch=2, fused=False, compile=False)),
                      ("meta:rnnprop-paper:K=2", "rnnprop-paper", dict(meta_batch=2)),
                      ("meta:rnnprop-paper:K=2[reference]", "rnnprop-paper",
                       dict(meta_batch=2, fused=False, compile=False))]
        for key, name, options in cases:
            self.log(f"meta: {name}, {options}")
            config = preset(name, **{**overrides, **options})
            row = {"key": key, "preset": name, "meta_batch": config.meta_batch, "truncation": config.truncation,
                   "fused": config.fused, "compile": config.compile}
            rows.append(_guard(row, self.device, self._meta_case, config, peak))
        self.log("meta: memory across truncations")
        k, n = self.config.memory_meta_batch, self.config.memory_truncations
        config = preset("hyperadam-paper", meta_batch=k, seed=self.config.seed, **self.config.meta_overrides)
        row = {"key": f"meta-truncations:K={k}", "meta_batch": k, "truncations": n}
        rows.append(_guard(row, self.device, self._truncations_case, config, n, peak))
        return {"preset": "hyperadam-paper", "overrides": self.config.meta_overrides, "memory_method": peak.method,
                "rows": rows}

    def _meta_case(self, config: MetaConfig, peak: PeakMemory) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="metaopt-bench-") as run_dir:
            peak.current_bytes()  # release what earlier cases freed
            trainer = MetaTrainer(config, run_dir, device=self.device)
            task_bytes = peak.current_bytes()  # the process with the task loaded, before any meta-step
            for _ in range(max(self.warmup, 1)):  # the first meta-step compiles the fused cell where it is compiled
                trainer.meta_step_once()
            peak.reset()
            stats = self.time(trainer.meta_step_once, warmup=0, flush_cache=False)
            peak_bytes = peak.peak_bytes()
            del trainer
        inner_steps = config.meta_batch * config.truncation
        out = {"time_s": stats, "inner_steps_per_s": inner_steps / stats["median_s"], "peak_memory_bytes": peak_bytes}
        if task_bytes is not None:
            out.update(task_memory_bytes=task_bytes, peak_over_task_bytes=peak_bytes - task_bytes)
        return out

    def _truncations_case(self, config: MetaConfig, n: int, peak: PeakMemory) -> dict[str, Any]:
        peaks = []
        with tempfile.TemporaryDirectory(prefix="metaopt-bench-") as run_dir:
            trainer = MetaTrainer(config, run_dir, device=self.device)
            for _ in range(n):
                peak.reset()
                trainer.meta_step_once()
                peaks.append(peak.peak_bytes())
            del trainer
        return {"peak_memory_bytes": peaks, "first_peak_bytes": peaks[0], "last_peak_bytes": peaks[-1],
                "last_over_first": peaks[-1] / peaks[0]}

    # -- 4. Table 1 ------------------------------------------------------------------------------------------------

    def table1_section(self) -> dict[str, Any]:
        self.drop_flush_buffer()
        suite = SUITES["hyperadam-table1"]
        # The suite's optimizers with their rates (no learning-rate tuning: evaluate_suite runs the given rates) and
        # HyperAdam; the learned labels get fresh instances through ``sources`` (no checkpoints are committed).
        optimizers = {**suite.optimizers, "hyperadam": suite.optimizers.get("hyperadam", {})}
        sources = {label: FRESH_LEARNED[label]() for label in optimizers if label in FRESH_LEARNED}
        seeds, steps = self.config.num_table1_seeds, self.config.table1_steps
        device = str(self.device)

        def run(seed_list: range, num_steps: int | None) -> list[Any]:
            runs = evaluate_suite(suite, optimizers, seed_list, num_steps, device=device, progress=False,
                                  sources=sources)
            synchronize(self.device)
            return runs

        self.log(f"table1: {seeds} seeds")
        run(range(1), 1)  # warm-up: loads the datasets onto the device, initializes the kernels
        runs: list[Any] = []
        samples = []
        for _ in range(self.config.table1_repeats):
            begin = time.perf_counter()
            runs = run(range(seeds), steps)
            samples.append(time.perf_counter() - begin)
        per_update = {}
        for label in optimizers:
            own = [r.seconds_per_step for r in runs if r.optimizer == label]
            if own:
                per_update[label] = sum(own) / len(own)
        row = {"key": f"table1:{seeds}-seeds", "seeds": seeds, "steps": steps or suite.steps,
               "tasks": [getattr(t, "label", t) for t in suite.tasks], "optimizers": list(optimizers),
               "time_s": summarize(samples), "seconds_per_update": per_update}
        return {"suite": suite.name, "learned_sources": sorted(sources), "rows": [row]}


# ----------------------------------------------------------------------------------------------------------------------
# The report


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it (None outside a git checkout).
    ``--no-optional-locks`` keeps ``git status`` from writing the index."""
    commit = _git("rev-parse", "HEAD")
    status = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: torch.device) -> dict[str, Any]:
    git = git_commit()
    return {"device": device.type,
            "device_name": device_name(device),
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "python": platform.python_version(), "metaopt": metaopt.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git["commit"], "git_dirty": git["dirty"], "cpu_threads": torch.get_num_threads()}


def run_benchmarks(config: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the sections ``config`` names and return the report (the JSON ``python -m metaopt.bench`` writes)."""
    device = resolve_device(config.device)
    bench = Bench(config, device, log)
    report: dict[str, Any] = {"format_version": FORMAT_VERSION, "environment": environment(device),
                              "settings": config.settings(), "bandwidth": bench.measure_bandwidth(),
                              "skipped_optimizers": bench.skipped, "sections": {}}
    runners = {"faces": lambda: faces_section(device, bench.repeats, bench.warmup, config.quick, config.seed, log),
               "step": bench.step_section, "iteration": bench.iteration_section, "meta": bench.meta_section,
               "table1": bench.table1_section}
    for section in (s for s in SECTIONS if s in config.sections):  # in this order, whatever the order of --only
        begin = time.perf_counter()
        try:
            report["sections"][section] = runners[section]()
        except DatasetNotFoundError as err:  # the real data is not on this machine: say so, measure the rest
            report["sections"][section] = {"skipped": str(err), "rows": []}
        report["sections"][section]["wall_s"] = time.perf_counter() - begin  # to plan runs on a lent GPU
    report["targets"] = judge_targets(report)
    report["anchors"] = ANCHORS
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Markdown


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def _format(metric: str, value: float) -> str:
    if metric == "inner_steps_per_s":
        return f"{value:,.0f} inner steps/s"
    if metric.endswith("bytes"):
        return _gb(value)
    if metric.startswith("ratio") or metric == "last_over_first":
        return f"{value:.3g}×"
    return format_seconds(value)


def _target_cell(targets: list[dict[str, Any]], key: str, family: str | None = None) -> str:
    """The targets of the row ``key``: a judged target shows on the row it was measured on (the best variant of a
    learned optimizer), an unmeasured one on the row of its key or on every row of its family."""
    cells = []
    for t in targets:
        if t.get("row", key) == key and t["key"] in (key, family):
            status = {True: ": pass", False: ": FAIL", None: ""}[t["passed"]]
            cells.append(f"{t['text']}{status}")
    return "; ".join(cells) or "–"


def _anchor_cell(anchors: dict[str, Any], key: str) -> str:
    cells = [f"{_format(a['metric'], a['value'])} ({a['text']})" for a in anchors.get("values", []) if a["key"] == key]
    return "; ".join(cells) or "–"


def markdown_report(report: dict[str, Any]) -> str:
    """The report as Markdown for the README: a header line, then per section a table with the columns
    measurement | measured | roofline | ratio | target | anchor (targets marked pass / FAIL when judged on CUDA)."""
    env, targets, anchors = report["environment"], report.get("targets", []), report.get("anchors", {})
    commit = (env.get("git_commit") or "unknown")[:12] + (" (modified)" if env.get("git_dirty") else "")
    lines = [f"Measured on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}, "
             f"commit {commit}."]
    bandwidth = report.get("bandwidth")
    if bandwidth:
        lines.append(f"Copy bandwidth (read + write): {bandwidth['bytes_per_s'] / 1e9:,.0f} GB/s.")
    header = ["", "| measurement | measured | roofline | ratio | target | anchor |", "|---|---|---|---|---|---|"]

    def row(key: str, label: str, measured: str, roofline: str = "–", ratio: str = "–",
            family: str | None = None) -> str:
        return (f"| {label} | {measured} | {roofline} | {ratio} | {_target_cell(targets, key, family)} | "
                f"{_anchor_cell(anchors, key)} |")

    def checked(r: dict[str, Any]) -> str:  # a fast variant's agreement with the reference path
        return f" (Δ vs reference {r['check']['max_rel_diff']:.2g})" if "check" in r else ""

    titles = {"faces": "Optimizer step against torch.optim (ratio = step / baseline's step, or / compute floor)",
              "step": "Optimizer step (median; ratio = measured / memory roofline)",
              "iteration": "Training iteration: forward + backward + step",
              "meta": "Meta-training, hyperadam-paper preset",
              "table1": "hyperadam-table1 suite, end to end"}
    for name, section in report.get("sections", {}).items():
        lines += ["", f"**{titles.get(name, name)}**"]
        if section.get("skipped"):
            lines.append(f"Skipped: {section['skipped'].splitlines()[0]}")
            continue
        if name == "faces":
            lines += faces_markdown(section)
            continue
        lines += header
        for r in section.get("rows", []):
            key = r["key"]
            family = r.get("family")
            if "error" in r:
                lines.append(row(key, key, r["error"], family=family))
            elif name == "step":
                label = (f"{r['optimizer']} step on {r['learner']}" + (" (with closure)" if r.get("includes_closure")
                                                                       else "") + checked(r))
                roofline = format_seconds(r["roofline_s"]) if "roofline_s" in r else "–"
                ratio = f"{r['ratio_to_roofline']:.3g}×" if "ratio_to_roofline" in r else "–"
                lines.append(row(key, label, format_seconds(r["time_s"]["median_s"]), roofline, ratio, family))
            elif name == "iteration":
                ratios = []
                if "ratio_to_adam" in r:
                    ratios.append(f"{r['ratio_to_adam']:.3g}× Adam")
                if "ratio_to_base" in r:
                    ratios.append(f"{r['ratio_to_base']:.3g}× {r['base']}")
                lines.append(row(key, f"{r['optimizer']} on {r['model']}{checked(r)}", format_seconds(r["time_s"]["median_s"]),
                                 ratio="; ".join(ratios) or "–", family=family))
            elif name == "meta" and "truncations" in r:
                lines.append(row(key, f"peak memory, truncation 1 vs {r['truncations']} (K = {r['meta_batch']})",
                                 f"{_gb(r['first_peak_bytes'])} → {_gb(r['last_peak_bytes'])}",
                                 ratio=f"{r['last_over_first']:.3g}× (last / first)"))
            elif name == "meta":
                over = (f" ({_gb(r['peak_over_task_bytes'])} above the task)" if "peak_over_task_bytes" in r else "")
                what = r.get("preset", "hyperadam-paper") + ("" if r.get("fused", True) else ", reference path")
                lines.append(row(key, f"{what}, K = {r['meta_batch']} tasks",
                                 f"{r['inner_steps_per_s']:,.0f} inner steps/s, peak {_gb(r['peak_memory_bytes'])}"
                                 f"{over}"))
            else:
                lines.append(row(key, f"{r['seeds']} seeds × {r['steps']} steps", format_seconds(r["time_s"]["median_s"])))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m metaopt.bench", description=__doc__.split("\n\n")[0],
        epilog="Image tasks read Fashion-MNIST from $METAOPT_DATA, ~/.cache/metaopt or /usr/share/datasets; without "
               "it the meta and table1 sections are recorded as skipped.")
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes that run in seconds on a CPU (MLP-9x20 only, 2 repeats, K in {1, 2}, "
                             "2 seeds x 5 steps); what CI runs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto (default) = cuda when available, else cpu")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="write the report as JSON here")
    parser.add_argument("--markdown", default=None, metavar="FILE.md", help="also write the Markdown table here")
    parser.add_argument("--only", default=",".join(SECTIONS), metavar="SECTION,...",
                        help=f"comma-separated sections to run (default: all), of: {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed calls per measurement (default: 20; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="untimed calls before each measurement (default: 3; 1 with --quick)")
    parser.add_argument("--table1-seeds", type=int, default=None, metavar="N",
                        help="seeds of the table1 section (default: 100, the target's; 2 with --quick)")
    parser.add_argument("--table1-repeats", type=int, default=1, metavar="N",
                        help="timed runs of the whole table1 suite (default: 1; each is minutes at 100 seeds)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's own; 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, gradients and inputs (default: 0)")
    parser.add_argument("--variants", default=None, metavar="VARIANT,...",
                        help="variants of the learned optimizers' frozen face to time, of: "
                             f"{', '.join(LEARNED_VARIANTS)} (default: all; {','.join(QUICK_VARIANTS)} with --quick, "
                             "as compiling takes longer than the rest of a quick run; "
                             f"{' and '.join(sorted(CUDA_VARIANTS))} only on CUDA)")
    parser.add_argument("--render", default=None, metavar="FILE.json",
                        help="print the Markdown table of an earlier report and exit (runs nothing)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(markdown_report(json.loads(Path(args.render).read_text())), end="")
        return 0
    try:
        config = BenchConfig(device=args.device, quick=args.quick,
                             sections=tuple(s.strip() for s in args.only.split(",") if s.strip()),
                             repeats=args.repeats, warmup=args.warmup, table1_seeds=args.table1_seeds,
                             table1_repeats=args.table1_repeats, threads=args.threads, seed=args.seed,
                             variants=None if args.variants is None else tuple(
                                 v.strip() for v in args.variants.split(",") if v.strip()))
        resolve_device(config.device)
    except ValueError as err:
        raise SystemExit(f"python -m metaopt.bench: {err}") from None
    torch.manual_seed(config.seed)  # the entry point seeds: model weights and fresh θ come from the global RNG
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        report = run_benchmarks(config, log=lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)  # main() may run inside another process (the tests)
    text = json.dumps(report, indent=2, allow_nan=False)  # a NaN or inf here is a bug: refuse to write it
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    table = markdown_report(report)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
