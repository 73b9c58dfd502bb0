"""Hand-designed hypergradient learning-rate optimizers (``../shared/specs/hypergradient.md`` is normative).

Importing this package registers them: ``sgd-hd sgdn-hd adam-hd`` (Baydin et al. 2018), ``tlr tlr-pl tlr-naive``
(Trainable Learning Rate).
"""

from metaopt.hypergrad import hd, tlr  # noqa: F401
