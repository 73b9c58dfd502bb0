"""metaopt: learned optimizers and hypergradient learning-rate adaptation for PyTorch.

Public API (a contract, see DESIGN.md):

    metaopt.OPTIMIZERS                               # every registered optimizer name
    metaopt.make_optimizer(name, params, **hparams)  # a torch.optim.Optimizer
    metaopt.from_pretrained(name_or_dir)             # a learned optimizer, frozen
"""

# importing registers the optimizers, and (metaopt.checkpoint) make_optimizer of a checkpoint directory or instance
from metaopt import baselines, checkpoint, external, hypergrad, learned  # noqa: F401
from metaopt.core import CoreOptimizer, FunctionalOptimizer
from metaopt.learned import from_pretrained
from metaopt.registry import make_optimizer, register_optimizer, registered_names
from metaopt.version import __version__


OPTIMIZERS: tuple[str, ...] = registered_names()

__all__ = ["OPTIMIZERS", "CoreOptimizer", "FunctionalOptimizer", "from_pretrained", "make_optimizer", "register_optimizer",
           "__version__"]
