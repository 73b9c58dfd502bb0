"""Test-wide settings: no network services, no writes outside temp dirs, deterministic float64 where asked; on a
machine without CUDA, Triton's interpreter, so that the fused kernels of metaopt.learned.kernels run on CPU tensors
(Triton reads TRITON_INTERPRET when it and the kernels are first imported: this file runs before any test module)."""

import os
import tempfile

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="metaopt-mpl-"))
os.environ.setdefault("MPLBACKEND", "Agg")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
