"""Meta-training: the inner-loop engine that also serves evaluation and golden runs (:mod:`.inner`), truncated
unrolls over task distributions (:mod:`.unroll`), meta-gradient estimators (:mod:`.estimators`), the loop with exact
resume (:mod:`.trainer`), its configuration and presets (:mod:`.config`), campaigns of pieces (:mod:`.campaign`) and
the command line (:mod:`.cli`, above the evaluation: not imported here)."""

from metaopt.meta.config import PRESETS, MetaConfig, preset
from metaopt.meta.estimators import Estimate, MetaGradientEstimator, TruncatedBPTT
from metaopt.meta.trainer import MetaTrainer, TrainingStateError
from metaopt.meta.unroll import Slot, unroll

__all__ = ["PRESETS", "Estimate", "MetaConfig", "MetaGradientEstimator", "MetaTrainer", "Slot", "TrainingStateError",
           "TruncatedBPTT", "preset", "unroll"]
