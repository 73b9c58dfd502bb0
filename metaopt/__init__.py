"""metaopt: learned optimizers and hypergradient learning-rate adaptation for PyTorch.

Public API (a contract, see DESIGN.md):

    metaopt.OPTIMIZERS                               # every registered optimizer name
    metaopt.make_optimizer(name, params, **hparams)  # a torch.optim.Optimizer
"""

from metaopt import baselines, hypergrad  # noqa: F401  (importing registers the optimizers)
from metaopt.core import CoreOptimizer, FunctionalOptimizer
from metaopt.registry import make_optimizer, register_optimizer, registered_names

__version__ = "0.1.0"

OPTIMIZERS: tuple[str, ...] = registered_names()

__all__ = ["OPTIMIZERS", "CoreOptimizer", "FunctionalOptimizer", "make_optimizer", "register_optimizer",
           "__version__"]
