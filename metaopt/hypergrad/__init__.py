"""Hand-designed hypergradient learning-rate optimizers (``../shared/specs/hypergradient.md`` is normative).

Importing this package registers them: ``sgd-hd sgdn-hd adam-hd`` (Baydin et al. 2018).
"""

from metaopt.hypergrad import hd  # noqa: F401
