"""What machine a result came from, in words, for the files that every number in the README traces to; and how long a
long job has left, in words, for its progress lines."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``) and the cores this process may use, e.g. "AMD EPYC, 2 cores"."""
    name = platform.processor() or platform.machine() or "cpu"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            name = match.group(1).strip()
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def device_name(device: str | torch.device) -> str:
    """The GPU's name for a CUDA device (``torch.cuda.get_device_name``), else :func:`cpu_name`."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def time_left(elapsed: float, done: int, total: int, cap: float | None = None) -> str:
    """The estimated time left after ``done`` of ``total`` units took ``elapsed`` seconds, in words ("~3 min left");
    ``cap``: seconds until a hard stop (``--max-minutes``), which bounds the estimate. "" before the first unit."""
    if done <= 0 or total <= done:
        return "" if done <= 0 else "done"
    seconds = elapsed / done * (total - done)
    stop = ""
    if cap is not None and cap < seconds:
        seconds, stop = max(cap, 0.0), " (to the time limit)"
    text = f"~{seconds:.0f} s" if seconds < 90 else f"~{seconds / 60:.0f} min" if seconds < 5400 else \
        f"~{seconds / 3600:.1f} h"
    return f"{text} left{stop}"
