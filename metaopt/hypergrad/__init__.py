"""Hand-designed hypergradient learning-rate optimizers (``../shared/specs/hypergradient.md`` is normative).

Importing this package registers them: ``sgd-hd sgdn-hd adam-hd`` (Baydin et al. 2018), ``hd-val rtho marthe``
(Donini et al., MARTHE), ``cam-hd-sgd cam-hd-sgdn cam-hd-adam`` (combined multi-level HD),
``tlr tlr-pl tlr-naive`` (Trainable Learning Rate). :mod:`.lrs_opt` computes the exact
hypergradient of a whole learning-rate schedule (LRS-OPT).
"""

from metaopt.hypergrad import cam_hd, hd, lrs_opt, marthe, tlr  # noqa: F401
