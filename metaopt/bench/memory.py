"""Memory: the peak-memory probe, the copy bandwidth, and the byte model behind the roofline."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from metaopt.bench.timing import measure, summarize
from metaopt.learned import DMOptimizer, HyperAdam, LearnedOptimizer, RNNprop
from metaopt.registry import MemoryModel, records


FLOAT_BYTES = 4  # float32
CACHE_FLUSH_BYTES = 256 * 2**20  # > 4× the L2 of an H100 / H200


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

