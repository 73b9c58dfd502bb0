"""Performance benchmarks: optimizer step time against the memory roofline, training iterations, meta-training
throughput and memory, and the wall time of the HyperAdam Table 1 suite.

This package owns ``python -m metaopt.bench`` (the issue "Performance"), the measurement method, the per-optimizer
byte model behind the roofline, the issue's targets and anchors, and the Markdown table the README shows::

    python -m metaopt.bench --out bench.json                 # everything, on CUDA when there is one
    python -m metaopt.bench --quick --device cpu             # tiny sizes, seconds on a CPU (CI)
    python -m metaopt.bench --only step,meta --repeats 50    # some sections
    python -m metaopt.bench --render bench.json              # the Markdown table of an earlier run

Sections (``--only``):

* ``faces`` — each registered optimizer's step as a user builds it (``make_optimizer``, defaults) against its
  ``torch.optim`` counterpart, its base optimizer, an SGD training iteration or its compute floor, timed side by side
  on two MLPs, with the speed issue's targets (:mod:`metaopt.bench.faces`).
* ``step`` — one optimizer step (``opt.step()`` with random, fixed gradients) of HyperAdam (J = 20), DMoptimizer and
  RNNprop with fresh, frozen θ, of every hand-designed optimizer in ``metaopt.OPTIMIZERS`` and of ``torch.optim.Adam``
  (foreach; fused on CUDA), on the parameters of MLP-9×20, CNN-2 and ResNet-18, next to the memory roofline
  (:class:`ByteModel` bytes / measured copy bandwidth). Optimizers that take a closure (MARTHE, RTHO, HD-val,
  TLR-naive) are timed for a whole ``opt.step(closure)``, their forward and backward passes included, and have no
  roofline.
* ``iteration`` — forward + backward + step on ResNet-18, batch 128 of random 32×32×3 inputs, with every optimizer,
  as a ratio to ``torch.optim.Adam`` (foreach) and, for the hypergradient methods, to their base optimizer.
* ``meta`` — meta-training throughput (inner steps/s = meta-batch K × truncation length / seconds per meta-step) and
  peak memory of the ``hyperadam-paper`` preset (``MetaTrainer.meta_step_once``; its default path: the fused,
  compiled cell of :mod:`metaopt.learned.fused`) for K = 1, 8, 32, 128 on CUDA and K = 1, 2, 8 on a CPU; at K = 2
  also the reference path (``fused=False``: autograd through the vmapped ``update``) and the ``dm-paper`` and
  ``rnnprop-paper`` presets, each on its default path (batched, compiled) and its reference path (``fused=False,
  compile=False``), so their speed-up is measured on one machine on one day; the peak memory of the first and the
  last of N truncations (it must stay flat). Memory rows carry the resident memory of the process once the trainer
  was built (data, learners, θ: "the task") and the peak above it.
* ``table1`` — the seconds ``evaluate_suite`` takes for ``hyperadam-table1`` at 100 seeds: the suite's optimizers at
  their rates (no tuning), the learned ones (HyperAdam, and DMoptimizer / RNNprop where the suite lists them) as fresh
  instances passed through ``sources=``, on the command line's path: seed by seed with the learned faces compiled on
  a CPU (not in a quick run), all seeds of a learned optimizer in one vmapped loop on CUDA.

In the ``step`` and ``iteration`` sections, learned optimizers are timed in each variant of their frozen face
(:data:`LEARNED_VARIANTS`, ``--variants``), one row each, named ``hyperadam[flat]``: ``reference`` (``fast=False``,
the functional update on dicts), ``flat`` (the flat-state fast path, eager), ``compiled`` (``compile=True``) and, on
CUDA, ``compiled-cudagraphs`` (``compile="reduce-overhead"``) and ``triton`` (``kernel=True``: one fused Triton kernel
per step, :mod:`metaopt.learned.kernels`). Before a fast variant is timed it runs 3 steps next to
the reference on the same gradients; the largest differences of parameters and state are recorded in the row
(``check``) and a difference beyond :data:`VARIANT_RTOL` stops the run (:class:`VariantMismatchError`): a fast path
that is wrong is not timed. The issue's targets for a learned optimizer judge its best variant (``variant`` in the
judged target).

Method: every timing is the median, with min and interquartile range, of ``--repeats`` timed calls after ``--warmup``
untimed ones. On CUDA each call is timed with CUDA events after a
``torch.cuda.synchronize()``, so the GPU starts idle and the host's launch overhead counts as an eager user sees it,
and after overwriting a 256 MiB buffer, so that a state that fits in L2 is not timed from the cache (as
``triton.testing.do_bench``). On the CPU ``time.perf_counter`` brackets each call. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set on the CPU (see :class:`PeakMemory`).
Everything is float32 with PyTorch's default backend settings, and eager but for the compiled variants, which are
compiled by their first (untimed) steps.

``--quick`` runs every section at toy sizes (MLP-9×20 only, also for the iteration, batch 32; K ∈ {1, 2} with 5-step
truncations; 2 seeds × 5 steps; one CPU thread; the ``reference`` and ``flat`` variants only, since compiling the
three learned optimizers costs 20–30 s of a CPU with a cold inductor cache, more than the rest of the quick run) in
seconds on a CPU; CI runs it. Targets are judged (``passed``) only on CUDA; on a CPU they are listed, not judged. A
full run on one GPU takes several minutes per section (``wall_s`` in the report; the table1 section is the longest):
run sections separately with ``--only`` under a time limit. A CUDA out-of-memory error in one case is recorded in its
row and the run goes on; a missing Fashion-MNIST marks the meta and table1 sections skipped.

Modules: :mod:`~metaopt.bench.timing` (timers and their statistics), :mod:`~metaopt.bench.memory` (peak memory, copy
bandwidth, the byte model behind the roofline), :mod:`~metaopt.bench.targets` (targets, anchors, judging),
:mod:`~metaopt.bench.config` (sections, learned variants, :class:`BenchConfig`), :mod:`~metaopt.bench.learners`
(learners, optimizers, the check of a fast variant), :mod:`~metaopt.bench.sections` (:class:`Bench`, one method per
section), :mod:`~metaopt.bench.faces` (the faces section), :mod:`~metaopt.bench.syncs` (host reads per step),
:mod:`~metaopt.bench.report` (environment, the run, Markdown) and :mod:`~metaopt.bench.cli` (the command line); this
module re-exports their names.
"""

from __future__ import annotations

from metaopt.bench.memory import (CACHE_FLUSH_BYTES, FLOAT_BYTES, HAND_DESIGNED_BYTES, ByteModel, PeakMemory,
                                  copy_bandwidth, learned_byte_model, roofline_seconds)
from metaopt.bench.targets import ANCHORS, TARGETS, Target, judge_targets, _learned_step_targets, _lookup, _rows_by_key
from metaopt.bench.config import (CUDA_VARIANTS, FRESH_LEARNED, LEARNED_VARIANTS, QUICK_VARIANTS, SECTIONS,
                                  VARIANT_CHECK_STEPS, VARIANT_RTOL, BenchConfig)
from metaopt.bench.learners import (ADAM_REFERENCE, BASE_OPTIMIZER, LEARNERS, TORCH_ADAM, Learner,
                                    VariantMismatchError, build_optimizer, compare_with_reference, _guard, _kind,
                                    optimizer_names, _random_batch, _relative, _release, _stored_state_floats,
                                    _task_learner)
from metaopt.bench.sections import Bench
from metaopt.bench.report import (FORMAT_VERSION, NONNEGATIVE_FIELDS, REPO_ROOT, _anchor_cell, environment, _format,
                                  _gb, _git, git_commit, markdown_report, run_benchmarks, _target_cell)
from metaopt.bench.cli import main, parse_args
from metaopt.bench.faces import faces_markdown, faces_section
from metaopt.bench.timing import GRAD_SCALE, closure_step, format_seconds, measure, summarize, synchronize
