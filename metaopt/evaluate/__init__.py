"""Evaluation: frozen learned optimizers and hand-designed baselines on the papers' suites, from identical initial
weights and identical minibatches per seed, with tables, significance tests, files and figures.

This package owns

* :mod:`~metaopt.evaluate.suites` — the suites (:data:`SUITES`, one per paper experiment, each citing its section);
* :mod:`~metaopt.evaluate.runner` — :func:`evaluate_suite` (a grid of tasks × optimizers × seeds), learning-rate
  tuning on separate seeds and LRS-OPT; the runs are the inner-loop engine's, :mod:`metaopt.meta.inner`
  (:func:`train`: one seed, :func:`train_batched`: all seeds of a learned optimizer in one vmapped loop), re-exported
  here;
* :mod:`~metaopt.evaluate.report` — mean ± s.e., the Wilcoxon test, :func:`markdown_table`, JSON / CSV and PNGs;
* :mod:`~metaopt.evaluate.experiment` — :func:`run_suite`, one suite end to end;
* :mod:`~metaopt.evaluate.results` — the README's Results section rendered from the committed results
  (``python -m metaopt.evaluate.results --help``; not imported here, so that ``-m`` runs it cleanly); and
* :mod:`~metaopt.evaluate.cli` — ``python -m metaopt.evaluate --help``::

    python -m metaopt.evaluate --suite hyperadam-table1 --optimizers hyperadam,adam --seeds 10 --out runs/table1
"""

from metaopt.evaluate.cli import build_parser, main
from metaopt.evaluate.experiment import (MissingCheckpoints, SelectionError, SuiteResult, TimeLimitReached,
                                         run_suite)
from metaopt.evaluate.report import markdown_table, mean_se, paired_wilcoxon, significance
from metaopt.evaluate.runner import (TUNE_SEED_OFFSET, Run, build_task, can_batch, evaluate_suite, seeded_generators,
                                     train, train_batched)
from metaopt.evaluate.suites import SUITES, LrsOpt, Suite, Sweep, TaskSpec

__all__ = ["SUITES", "TUNE_SEED_OFFSET", "LrsOpt", "MissingCheckpoints", "Run", "SelectionError", "Suite",
           "SuiteResult", "Sweep", "TaskSpec", "TimeLimitReached", "build_parser", "build_task", "can_batch",
           "evaluate_suite", "main", "markdown_table", "mean_se", "paired_wilcoxon", "run_suite",
           "seeded_generators", "significance", "train", "train_batched"]
