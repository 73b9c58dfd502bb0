"""Meta-training: truncated unrolls over task distributions (:mod:`.unroll`), meta-gradient estimators
(:mod:`.estimators`), the loop with exact resume (:mod:`.trainer`), its configuration and presets (:mod:`.config`)
and the command line (:mod:`.cli`)."""

from metaopt.meta.config import PRESETS, MetaConfig, preset
from metaopt.meta.estimators import Estimate, MetaGradientEstimator, TruncatedBPTT
from metaopt.meta.trainer import MetaTrainer, TrainingStateError
from metaopt.meta.unroll import Slot, unroll

__all__ = ["PRESETS", "Estimate", "MetaConfig", "MetaGradientEstimator", "MetaTrainer", "Slot", "TrainingStateError",
           "TruncatedBPTT", "preset", "unroll"]
