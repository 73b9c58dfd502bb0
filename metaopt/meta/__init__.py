"""Meta-training: truncated unrolls over task distributions (:mod:`.unroll`), the loop with exact resume
(:mod:`.trainer`), its configuration and presets (:mod:`.config`) and the command line (:mod:`.cli`)."""

from metaopt.meta.config import PRESETS, MetaConfig, preset
from metaopt.meta.trainer import MetaTrainer, TrainingStateError
from metaopt.meta.unroll import Slot, unroll

__all__ = ["PRESETS", "MetaConfig", "MetaTrainer", "Slot", "TrainingStateError", "preset", "unroll"]
