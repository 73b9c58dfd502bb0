"""Test-wide settings: no network services, no writes outside temp dirs, deterministic float64 where asked."""

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="metaopt-mpl-"))
os.environ.setdefault("MPLBACKEND", "Agg")
