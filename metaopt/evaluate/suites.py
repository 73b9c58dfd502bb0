"""The evaluation suites: which tasks, how many steps, which optimizers with which hyper-parameters, and what to
compare against — one frozen :class:`Suite` per experiment of the papers in ``../shared/papers``.

Suite names are a contract (``python -m metaopt.evaluate --suite NAME``). Fashion-MNIST stands in for MNIST
everywhere the papers used MNIST; ``--dataset`` switches (``mnist``, ``cifar10``). Where a paper leaves a value open,
the choice is written next to it.

Optimizer *labels* name a configuration: a registered name (``adam``) with the suite's hyper-parameters, or a variant
such as ``sgd-hd lr=0.01 beta=1e-05`` whose registered name is in :attr:`Suite.sources`. Labels listed in
:attr:`Suite.learned` are learned optimizers, loaded from ``<checkpoints>/<label>/`` (``config.json`` +
``model.safetensors``, see ``DESIGN.md``) or passed as ``LearnedOptimizer`` instances.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a suite.

    Args:
        label: the row name in tables and files (unique in the suite).
        name: the ``meta_tasks`` task name.
        options: ``meta_tasks.get_task`` options (architecture, ``batch_size``, ``val_size``).
        train_size: keep a fixed random subset of this many training examples (MARTHE Sec. 5: 7,000).
        hparams: task-specific hyper-parameters per registered optimizer name, merged over the suite's (CAM-HD's
            levels differ between MLPs and CNNs).
        x: the task's position when the suite sweeps over tasks (the MLP depth of HyperAdam Fig. 5d).
    """

    label: str
    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train_size: int | None = None
    hparams: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    x: float | None = None


def as_spec(task: str | TaskSpec) -> TaskSpec:
    """A plain task name is the task with its default options, labelled by its name."""
    return task if isinstance(task, TaskSpec) else TaskSpec(task, task)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """How a suite's runs lie on a sweep, for ``sweep.md`` and ``sweep.png`` (one panel per task, or one panel).

    ``over="optimizers"``: ``points`` maps an optimizer label to (series, x) — e.g. "sgd-hd beta=1e-05" to
    ("sgd-hd beta=1e-05", 0.01) on an initial-learning-rate axis; labels not in ``points`` are left out.
    ``over="tasks"``: x is each task's :attr:`TaskSpec.x`, the series is the optimizer, one panel.
    ``metric``: ``train_loss`` (final training loss) or ``<split>_<key>`` (``test_top1``, ``val_top1``, ``test_loss``).
    ``heatmap``: also draw ``heatmap.png``, one heatmap per series over (task, x) — TLR Figs. 1-2's robustness grids.
    """

    axis: str
    metric: str
    over: str = "optimizers"
    points: Mapping[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
    log_x: bool = True
    heatmap: bool = False


@dataclasses.dataclass(frozen=True)
class LrsOpt:
    """LRS-OPT (MARTHE Sec. 5): projected gradient descent on the whole schedule, from η = ``init_lr``·1_T, for
    ``outer_steps`` iterations of step ``outer_lr``, on the first ``seeds`` seeds, with SGD as the dynamics.

    ``outer`` is how each iteration steps (:func:`metaopt.hypergrad.lrs_opt.optimize_schedule`): ``"adam"`` (default,
    step 1e-3) or the plain gradient step ``"gd"``. The paper gives neither the method's step size nor more than
    "gradient descent"; the plain step at the 0.1 this suite first used threw the last rates of the FFNN's schedule
    to ~21 in one iteration and training diverged (the hypergradient's entries span ~0.4 to ~200 along the schedule),
    so the per-rate normalized step is the default, each rate moving by about 1e-3 per iteration."""

    seeds: int = 4
    outer_steps: int = 5000
    outer_lr: float = 1e-3
    init_lr: float = 0.01
    outer: str = "adam"


@dataclasses.dataclass(frozen=True)
class Suite:
    """A set of tasks evaluated for ``steps`` optimizer steps, with default optimizers and their hyper-parameters.

    Args:
        name, tasks, steps, optimizers, description: the suite; ``optimizers`` maps a label to its hyper-parameters.
        seeds: the paper's number of repetitions (the default of ``--seeds``).
        reference: the optimizer the Wilcoxon test compares against (default: the first).
        references: per-label reference where pairs differ (``sgd lr=0.01`` against ``tlr lr=0.01``).
        sources: label → registered name for labels that are not registered names.
        learned: labels that need a checkpoint (``<checkpoints>/<label>``) or a ``LearnedOptimizer`` instance.
        tune: label → learning-rate grid, searched on separate seeds when tuning is on (the default when non-empty).
        tune_in_hindsight: search the grid on the evaluation seeds themselves (the rate chosen in hindsight: the
            strongest version of the baseline) instead of on separate seeds.
        splits: held-out splits evaluated after training (``test``; ``val`` where the method targets it).
        eval_every: evaluate the first of ``splits`` every this many steps (0: only at the end).
        compare: the final value the Wilcoxon test compares: ``train_loss`` or ``<split>_<key>`` (``test_top1``).
        record_lr: keep each step's learning rate (the schedules of MARTHE Fig. 2).
        sweep: how the runs form a sweep (see :class:`Sweep`); None for none.
        lrs_opt: run LRS-OPT too (MARTHE Sec. 5).
        quick_tasks, quick_optimizers: the labels ``--quick`` keeps (None: all).
        checkpoint_subdir: where the learned labels' checkpoints are, under the checkpoints root (``""``: the root
            itself, ``checkpoints/<label>``; the ablation's variants live in ``checkpoints/hyperadam-ablation/``).
        papers_measure: also compute the papers' final loss, the loss of the final weights averaged over the run's
            training minibatches (``batches_loss``, :func:`metaopt.evaluate.runner.final_batches_loss`), reported
            beside the final training loss; ``compare`` and the verdicts are unchanged by it.
    """

    name: str
    tasks: tuple[str | TaskSpec, ...]
    steps: int
    optimizers: Mapping[str, Mapping[str, Any]]
    description: str = ""
    seeds: int = 10
    reference: str | None = None
    references: Mapping[str, str] = dataclasses.field(default_factory=dict)
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    learned: tuple[str, ...] = ()
    tune: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    tune_in_hindsight: bool = False
    splits: tuple[str, ...] = ("test",)
    eval_every: int = 0
    compare: str = "train_loss"
    record_lr: bool = False
    sweep: Sweep | None = None
    lrs_opt: LrsOpt | None = None
    quick_tasks: tuple[str, ...] | None = None
    quick_optimizers: tuple[str, ...] | None = None
    checkpoint_subdir: str = ""
    papers_measure: bool = False

    def __post_init__(self) -> None:
        labels = [as_spec(t).label for t in self.tasks]
        if len(set(labels)) != len(labels):
            raise ValueError(f"Suite {self.name!r}: task labels repeat: {labels}")
        names = set(self.optimizers)
        for what, given in (("reference", [self.reference] if self.reference else []),
                            ("references", [*self.references, *self.references.values()]),
                            ("learned", self.learned), ("tune", self.tune),
                            ("quick_optimizers", self.quick_optimizers or ())):
            unknown = [label for label in given if label not in names]
            if unknown:
                raise ValueError(f"Suite {self.name!r}: {what} names unknown optimizers {unknown}")
        unknown = [t for t in self.quick_tasks or () if t not in labels]
        if unknown:
            raise ValueError(f"Suite {self.name!r}: quick_tasks names unknown tasks {unknown}")
        if self.compare != "train_loss" and self.compare.partition("_")[0] not in self.splits:
            raise ValueError(f"Suite {self.name!r}: compare {self.compare!r} is neither train_loss nor a metric of "
                             f"its splits {self.splits}")

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        return tuple(as_spec(t) for t in self.tasks)

    def source_of(self, label: str) -> str:
        """The registered name behind an optimizer label."""
        return self.sources.get(label, label)

    def reference_of(self, label: str) -> str:
        return self.references.get(label, self.reference or next(iter(self.optimizers)))


# ----------------------------------------------------------------------------------------------------------------------
# HyperAdam (Wang, Sun & Xu, AAAI 2019), Sec. 5


HYPERADAM_LEARNED = ("hyperadam", "hyperadam-general", "dm", "rnnprop")
# The shipped HyperAdam with its step size α tuned per task on the baselines' separate seeds: a diagnostic beside the
# paper's protocol (the checkpoint's own α). Measured on hyperadam-table2 (5 seeds, Adam at lr 0.03): at its
# α = 0.005 it ends at 1.8-4.2x Adam's loss on the LSTM tasks, at the best α of 0.01 / 0.02 / 0.04 below Adam's on all
# three (0.320 vs 0.358, 0.222 vs 0.291, 0.141 vs 0.181): there the shipped weights lose by their step size alone.
HYPERADAM_TUNED = "hyperadam tuned-lr"
HYPERADAM_LR_GRID = (0.00125, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)
# Sec. 5: "For the traditional optimizers, we hand-tuned the learning rates and set other hyperparameters as defaults".
# Our hand-tuning: five rates a factor ~3 apart around each optimizer's usual range, chosen on separate seeds; the
# middle value is the rate used without tuning.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "sgd": (0.03, 0.1, 0.3, 1.0, 3.0),
    "momentum": (0.003, 0.01, 0.03, 0.1, 0.3),
    "adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "rmsprop": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "adagrad": (3e-3, 0.01, 0.03, 0.1, 0.3),
    "adadelta": (0.1, 0.3, 1.0, 3.0, 10.0),
}


# The parameter-free and schedule-free baselines of metaopt.external, at their authors' defaults and never tuned (not
# needing a learning rate is their promise): the comparison a learned optimizer has to win today, beside the papers'.
PARAMETER_FREE = ("schedule-free-adamw", "prodigy", "d-adapt-adam", "dog", "mechanic-adam")


def _hyperadam_lineup(classic: tuple[str, ...] = tuple(LR_GRIDS)) -> dict[str, Any]:
    """The Sec. 5 comparison: the three learned optimizers (their checkpoints' α) and the tuned classic ones, then
    the untuned parameter-free baselines."""
    optimizers = {name: {} for name in HYPERADAM_LEARNED}
    optimizers[HYPERADAM_TUNED] = {"lr": HYPERADAM_LR_GRID[len(HYPERADAM_LR_GRID) // 2]}
    optimizers.update({name: {"lr": LR_GRIDS[name][len(LR_GRIDS[name]) // 2]} for name in classic})
    optimizers.update({name: {} for name in PARAMETER_FREE})
    return dict(optimizers=optimizers, learned=HYPERADAM_LEARNED, reference="hyperadam",
                sources={HYPERADAM_TUNED: "hyperadam"},
                tune={HYPERADAM_TUNED: HYPERADAM_LR_GRID, **{name: LR_GRIDS[name] for name in classic}},
                quick_optimizers=("hyperadam", "adam"))


# Sec. 5 Fig. 8: HyperAdam variants, one checkpoint each, named <checkpoints>/<label>.
ABLATION_CHECKPOINTS: dict[str, str] = {
    "hyperadam": "the full HyperAdam: J = 20, LSTM and preprocessing, meta-trained with Random Scaling and CC",
    **{f"hyperadam-J{j}": f"J = {j} candidate updates (num_candidates={j})" for j in (1, 5, 10, 15, 25, 35)},
    "hyperadam-no-rs": "meta-trained without Random Scaling",
    "hyperadam-no-cc": "meta-trained without Combination with a Convex function",
    "hyperadam-no-tricks": "meta-trained with neither trick",
    "hyperadam-no-lstm": "StateCell without its LSTM block (use_lstm=False)",
    "hyperadam-no-preprocess": "StateCell without preprocessing (preprocess=False)",
    "hyperadam-no-lstm-no-preprocess": "StateCell without either (use_lstm=False, preprocess=False)",
}
ABLATION_J = {"hyperadam": 20, **{f"hyperadam-J{j}": j for j in (1, 5, 10, 15, 25, 35)}}

# DoG's authors: reps_rel 1e-4 "if the model uses batch-normalization" (the package's error message; 1e-6 otherwise)
DOG_BATCHNORM = {"dog": {"reps_rel": 1e-4}}

PARAMETER_FREE_NOTE = "The parameter-free baselines (metaopt.external) run at their authors' defaults, untuned."
TUNED_HYPERADAM_NOTE = (f"'{HYPERADAM_TUNED}' is the shipped HyperAdam with its step size tuned per task likewise "
                        "(a diagnostic; the paper's protocol is the checkpoint's own step size).")
HYPERADAM_NOTE = ("Fashion-MNIST stands in for MNIST; --dataset switches. Final training loss after the last step, "
                  "mean over seeds; learning rates of the classic optimizers tuned on separate seeds. "
                  + TUNED_HYPERADAM_NOTE + " " + PARAMETER_FREE_NOTE)

_HYPERADAM_SUITES = [
    Suite("hyperadam-table1", ("mlp-sigmoid", "mlp-relu", "mlp-elu", "mlp-tanh"), 100, seeds=100, papers_measure=True,
          description="HyperAdam Sec. 5.1, Table 1 / Fig. 5a: MLP 784-20-10 with sigmoid, ReLU, ELU and tanh units, "
                      "100 steps, batch 128. " + HYPERADAM_NOTE,
          **_hyperadam_lineup()),
    Suite("hyperadam-depth", tuple(TaskSpec(f"mlp-depth-{d}", "mlp-deep", {"depth": d}, x=d) for d in range(1, 11)),
          100, seeds=100, papers_measure=True,
          description="HyperAdam Sec. 5.1, Fig. 5b/5d: sigmoid MLPs with 1-10 hidden layers of 20 units, 100 steps. "
                      + HYPERADAM_NOTE,
          sweep=Sweep("hidden layers", "train_loss", over="tasks", log_x=False),
          quick_tasks=("mlp-depth-1", "mlp-depth-10"), **_hyperadam_lineup()),
    Suite("hyperadam-table2", ("lstm-sine", "lstm-sine-small-noise", "lstm-sine-2layer"), 100, seeds=100,
          papers_measure=True,
          description="HyperAdam Sec. 5.1, Table 2 / Fig. 5c: LSTM (20 units) predicting f(10) of a noisy sine "
                      "from f(0..9): noise N(0, 0.1), small noise N(0, 0.01), two layers; 100 steps, squared error; "
                      "learning rates of the classic optimizers tuned on separate seeds. " + TUNED_HYPERADAM_NOTE
                      + " " + PARAMETER_FREE_NOTE,
          **_hyperadam_lineup()),
    Suite("hyperadam-cnn", ("cnn-1", "cnn-2", TaskSpec("cnn-1-bn", "cnn-1-bn", hparams=DOG_BATCHNORM), "cnn-2-dropout"),
          100, seeds=100,
          description="HyperAdam Sec. 5.1, Fig. 6a/b/e/f: CNN-1 (c-c-p-f), CNN-2 (c-c-p-c-c-p-f-f), CNN-1 with "
                      "batch normalization, CNN-2 with dropout 0.5; 100 steps. The paper trained the last two on "
                      "CIFAR-10 (--dataset cifar10). " + HYPERADAM_NOTE,
          **_hyperadam_lineup()),
    Suite("hyperadam-long", (TaskSpec("mlp-deep", "mlp-deep", {"depth": 9}), "lstm-sine-2layer", "cnn-2"), 10_000,
          seeds=10,
          description="HyperAdam Sec. 5.2, Figs. 6c/d and 7: 10,000 steps (100x the meta-training horizon) on a "
                      "9-hidden-layer sigmoid MLP, the 2-layer LSTM and CNN-2; 10 seeds (our choice: the paper shows "
                      "curves). " + HYPERADAM_NOTE,
          **_hyperadam_lineup()),
    Suite("hyperadam-table3", ("cnn-1", "cnn-2"), 10_000, seeds=10, compare="test_loss",
          description="HyperAdam Sec. 5.3, Table 3: test loss, top-1 and top-2 accuracy (the paper lists error) of "
                      "CNN-1 and CNN-2 after 10,000 steps; 10 seeds (our choice). " + HYPERADAM_NOTE,
          **_hyperadam_lineup(("adam",))),
    Suite("hyperadam-ablation", (TaskSpec("mlp-3", "mlp-deep", {"depth": 3}),
                                 TaskSpec("mlp-4", "mlp-deep", {"depth": 4})), 100, seeds=100,
          optimizers={label: {} for label in ABLATION_CHECKPOINTS}, learned=tuple(ABLATION_CHECKPOINTS),
          reference="hyperadam", checkpoint_subdir="hyperadam-ablation",
          description="HyperAdam Sec. 5.4, Fig. 8: variants on sigmoid MLPs with 3 hidden layers (Fig. 8a/b: LSTM, "
                      "preprocessing, training tricks) and 4 (Fig. 8c: J = 1 ... 35), 100 steps. Each variant is a "
                      "checkpoint checkpoints/hyperadam-ablation/<label>, all meta-trained with one shared budget by "
                      "python -m metaopt.meta.ablation (the full model too): " + "; ".join(f"{k}: {v}" for k, v in
                                                                       ABLATION_CHECKPOINTS.items()) + ".",
          sweep=Sweep("J (candidate updates)", "train_loss",
                      points={label: ("HyperAdam", j) for label, j in ABLATION_J.items()}),
          quick_optimizers=("hyperadam", "hyperadam-J1", "hyperadam-no-lstm")),
]


# ----------------------------------------------------------------------------------------------------------------------
# CAM-HD (Jie et al., combined adaptive multi-level hypergradient descent), Sec. 4

def _epochs(epochs: int, examples: int, batch_size: int) -> int:
    return epochs * math.ceil(examples / batch_size)


CAMHD_NOTE = ("Held-out = the full test split (the paper's validation set). Fashion-MNIST stands in for MNIST; "
              "--dataset switches. Weights are Gaussian fan-in initialized (the paper: Xavier uniform).")
FFNN_EPOCH = math.ceil(60_000 / 128)  # steps per epoch of the paper's 60,000 MNIST images at batch 128

COMBINATION_GAMMAS = tuple(round(0.1 * i, 1) for i in range(11))


def _gamma_label(g: float) -> str:
    return f"cam-hd-adam gamma_g={g:g}"


# Sec. 4.3: 2-level CAM-HD over global and filter (unit) rates, γ = (0.2, 0.8), δ = 0.01; HD's recommended β.
_LENET_CAMHD = dict(lr=1e-3, levels=("unit", "global"), gamma=(0.2, 0.8), gamma_lr=0.01)

_CAMHD_SUITES = [
    Suite("hypergrad-ffnn",
          tuple(TaskSpec(f"ffnn-{a}x{b}", "ffnn", {"hidden": (a, b)}) for a, b in ((100, 100), (1000, 100),
                                                                                   (1000, 1000))),
          _epochs(30, 60_000, 128), seeds=30, eval_every=FFNN_EPOCH, compare="test_top1",
          optimizers={"adam": dict(lr=1e-3), "adam-hd": dict(lr=1e-3, hypergrad_lr=1e-7),
                      "cam-hd-adam": dict(lr=1e-3, hypergrad_lr=1e-7, levels=("parameter", "layer", "global"),
                                          gamma=(0.3, 0.3, 0.4), gamma_lr=0.1),
                      **{name: {} for name in PARAMETER_FREE}},
          reference="cam-hd-adam",
          description="CAM-HD Sec. 4.2, Fig. 3: FFNNs [100, 100], [1000, 100], [1000, 1000] (ReLU), batch 128, 30 "
                      "epochs, 30 trials; Adam / Adam-HD / 3-level CAM-HD-Adam at lr 1e-3, beta 1e-7, gamma "
                      "(0.3, 0.3, 0.4), delta 0.1. Held-out accuracy every epoch. " + CAMHD_NOTE + " "
                      + PARAMETER_FREE_NOTE),
    Suite("hypergrad-combination",
          # global + filter (unit) rates for CNNs; the FFNN's task entry switches to global + layer
          (TaskSpec("ffnn-100x3", "ffnn", {"hidden": (100, 100, 100), "batch_size": 256},
                    hparams={"cam-hd-adam": {"levels": ("layer", "global")}}),
           TaskSpec("lenet5", "lenet5", {"batch_size": 256})),
          _epochs(10, 60_000, 256), seeds=10, compare="test_top1",
          optimizers={_gamma_label(g): dict(lr=1e-3, hypergrad_lr=1e-7, levels=("unit", "global"),
                                            gamma=(round(1 - g, 10), g), gamma_lr=0.0) for g in COMBINATION_GAMMAS},
          sources={_gamma_label(g): "cam-hd-adam" for g in COMBINATION_GAMMAS},
          reference=_gamma_label(1.0),
          description="CAM-HD Sec. 4.1, Fig. 2: fixed combination weights (delta = 0) of two levels of Adam-HD "
                      "rates, gamma_global = 0, 0.1, ..., 1 (gamma_g = 1 is Adam-HD, the reference): global + layer "
                      "for an FFNN [100, 100, 100], global + filter for LeNet-5; lr 1e-3, beta 1e-7 (HD's "
                      "recommendation), batch 256, 10 epochs, 10 runs; held-out top-1 against gamma_g. The paper's "
                      "third panel, ResNet-18 on CIFAR-10, is --tasks resnet18 --dataset cifar10. " + CAMHD_NOTE,
          sweep=Sweep("gamma_global", "test_top1", points={_gamma_label(g): ("cam-hd-adam", g)
                                                           for g in COMBINATION_GAMMAS}, log_x=False),
          quick_optimizers=tuple(_gamma_label(g) for g in (0.0, 0.5, 1.0))),
    Suite("hypergrad-lenet", (TaskSpec("lenet5-5k", "lenet5", train_size=5000),),
          _epochs(30, 5000, 128), seeds=10, eval_every=math.ceil(5000 / 128), compare="test_top1",
          optimizers={"sgd": dict(lr=1e-3), "adam": dict(lr=1e-3),
                      "sgd-hd": dict(lr=1e-3, hypergrad_lr=1e-3), "adam-hd": dict(lr=1e-3, hypergrad_lr=1e-7),
                      "cam-hd-sgd": dict(_LENET_CAMHD, hypergrad_lr=1e-3),
                      "cam-hd-adam": dict(_LENET_CAMHD, hypergrad_lr=1e-7),
                      **{name: {} for name in PARAMETER_FREE}},
          reference="cam-hd-adam",
          references={"sgd": "cam-hd-sgd", "sgd-hd": "cam-hd-sgd", "cam-hd-sgd": "cam-hd-sgd"},
          description="CAM-HD Sec. 4.3, Fig. 4: LeNet-5 on a random 5,000-image training subset, batch 128; SGD / "
                      "Adam vs SGD-HD / Adam-HD vs 2-level (filter + global) CAM-HD, lr 1e-3, beta 1e-3 (SGD) and "
                      "1e-7 (Adam), gamma (0.2, 0.8), delta 0.01. 30 epochs and 10 trials are our choices (the paper "
                      "gives neither). SGD-type methods are tested against cam-hd-sgd. " + CAMHD_NOTE + " "
                      + PARAMETER_FREE_NOTE,
          quick_optimizers=("sgd-hd", "cam-hd-sgd", "adam", "cam-hd-adam")),
]


# ----------------------------------------------------------------------------------------------------------------------
# Trainable Learning Rate (Retsinas et al.), Sec. 5 "Robustness to hyperparameters" (Figs. 1, 2, 10)

TLR_LRS = (1e-3, 1e-2, 1e-1)
TLR_BATCHES = (64, 128, 256, 512)
TLR_HD_BETAS = (1e-5, 1e-4, 1e-3)  # Fig. 2: Baydin et al.'s β


def _tlr_optimizers() -> tuple[dict, dict, dict, dict]:
    optimizers, sources, references, points = {}, {}, {}, {}
    for lr in TLR_LRS:
        tlr = f"tlr lr={lr:g}"
        # window 0.33 of an epoch (App. D.1) with its App. D base (momentum 0.8, weight decay 5e-4): the runner sets
        # steps_per_epoch from each task's training-set size and batch size.
        variants = {tlr: ("tlr", "tlr", dict(lr=lr, window=0.33)),
                    f"sgd lr={lr:g}": ("sgd", "sgd", dict(lr=lr, momentum=0.8, weight_decay=5e-4))}
        variants.update({f"sgd-hd lr={lr:g} beta={b:g}": ("sgd-hd", f"sgd-hd beta={b:g}", dict(lr=lr, hypergrad_lr=b))
                         for b in TLR_HD_BETAS})
        for label, (source, series, hparams) in variants.items():
            optimizers[label], sources[label], points[label] = hparams, source, (series, lr)
            references[label] = tlr
    return optimizers, sources, references, points


_TLR_OPTS, _TLR_SOURCES, _TLR_REFS, _TLR_POINTS = _tlr_optimizers()

_TLR_SUITES = [
    Suite("tlr-robustness",
          tuple(TaskSpec(f"mlp-1000-bs{b}", "ffnn", {"hidden": (1000,), "batch_size": b}) for b in TLR_BATCHES),
          4000, seeds=3, optimizers=_TLR_OPTS, sources=_TLR_SOURCES, references=_TLR_REFS, reference="tlr lr=0.1",
          description="TLR Sec. 5, Figs. 1, 2 and 10: an MLP with one hidden layer of 1000 units, initial learning "
                      "rate {1e-3, 1e-2, 1e-1} x batch size {64, 128, 256, 512}: windowed TLR (p = 0.33, momentum "
                      "0.8, weight decay 5e-4, App. D) vs SGD with the same base vs SGD-HD over beta {1e-5, 1e-4, "
                      "1e-3}; each is tested against TLR at the same initial rate. 4,000 updates for every batch "
                      "size and 3 seeds (the paper: 3 runs) are our choices. Fashion-MNIST stands in for MNIST.",
          sweep=Sweep("initial learning rate", "train_loss", points=_TLR_POINTS, heatmap=True),
          quick_tasks=("mlp-1000-bs64", "mlp-1000-bs512"),
          quick_optimizers=tuple(f"{m} lr={lr:g}{b}" for lr in (1e-2, 1e-1)
                                 for m, b in (("tlr", ""), ("sgd", ""), ("sgd-hd", " beta=0.0001")))),
]


# ----------------------------------------------------------------------------------------------------------------------
# MARTHE (Donini et al.), Sec. 5 "Optimized and online schedules" (Fig. 2)

# The paper plots β on Fig. 2's axis without listing it; this decade grid spans stable to diverging runs of each
# method (measured on one seed: HD diverges at 1e-2, RTHO at 1e-2, MARTHE's adaptive-β step at 1e-4).
MARTHE_BETAS = tuple(10.0 ** -k for k in range(8, 1, -1))  # 1e-8 ... 1e-2
MARTHE_FIXED_MU = 0.99  # "Fixing μ = 0.99 seems to produce schedules that ..." (Sec. 5)


def _marthe_optimizers() -> tuple[dict, dict, dict]:
    base = dict(lr=0.01, base="sgd")  # SGD dynamics, η_0 = 0.01 for every adaptive method
    optimizers, sources, points = {"sgd": dict(lr=0.01)}, {}, {}
    for beta in MARTHE_BETAS:
        variants = {
            "hd-val": ("hd-val", dict(base, hypergrad_lr=beta)),                               # μ = 0
            "rtho": ("rtho", dict(base, hypergrad_lr=beta)),                                   # μ = 1
            f"marthe mu={MARTHE_FIXED_MU:g}": ("marthe", dict(base, mu=MARTHE_FIXED_MU, hypergrad_lr=beta,
                                                             adapt_hypergrad_lr=None)),
            "marthe h_mu": ("marthe", dict(base, mu="adaptive", hypergrad_lr=beta, adapt_hypergrad_lr=None)),
            # both adaptations: β_0 = 0 and β is the step size of the hyper-learning-rate update (Alg. 1)
            "marthe": ("marthe", dict(base, mu="adaptive", hypergrad_lr=0.0, adapt_hypergrad_lr=beta)),
        }
        for series, (source, hparams) in variants.items():
            label = f"{series} beta={beta:g}"
            optimizers[label], sources[label], points[label] = hparams, source, (series, beta)
    return optimizers, sources, points


_MARTHE_OPTS, _MARTHE_SOURCES, _MARTHE_POINTS = _marthe_optimizers()

_MARTHE_SUITES = [
    Suite("marthe-schedules",
          (TaskSpec("ffnn-3x500", "ffnn", {"hidden": (500, 500, 500), "batch_size": 100, "val_size": 700},
                    train_size=7000),),
          512, seeds=20, optimizers=_MARTHE_OPTS, sources=_MARTHE_SOURCES, reference="sgd", splits=("val", "test"),
          compare="val_top1",
          record_lr=True, lrs_opt=LrsOpt(),
          description="MARTHE Sec. 5, Fig. 2: an MLP with three hidden layers of 500 (ReLU) trained by SGD, batch "
                      "100, on 7,000 training images with 700 for validation, T = 512 steps, eta_0 = 0.01. Online "
                      "schedules (HD = hd-val, RTHO, MARTHE with mu = 0.99, with h_mu, with h_mu and adaptive beta) "
                      "over beta, final validation accuracy, 20 seeds; constant eta = 0.01 (sgd) is the reference; "
                      "LRS-OPT (the exact hypergradient of the final validation loss w.r.t. the whole schedule, 5000 "
                      "projected-gradient iterations from eta = 0.01, fresh minibatches each iteration) on 4 seeds. "
                      "The outer step size 0.1 is our choice (the paper gives none). Fashion-MNIST stands in for "
                      "MNIST.",
          sweep=Sweep("beta", "val_top1", points=_MARTHE_POINTS),
          quick_optimizers=("sgd", "hd-val beta=0.0001", "rtho beta=0.0001", "marthe beta=1e-06")),
]


# ----------------------------------------------------------------------------------------------------------------------
# The learned rules of metaopt.learned.rules against their hand-designed versions

_LEARNED_RULES_SUITES = [
    Suite("learned-rules", ("mlp-elu", "mlp-tanh", "cnn-2", "lenet5"), 1000, seeds=10,
          optimizers={"cam-hd-learned-gamma": {}, "cam-hd-adam": dict(lr=1e-3, hypergrad_lr=1e-7, gamma_lr=0.1),
                      "cam-hd-adam fixed-gamma": dict(lr=1e-3, hypergrad_lr=1e-7, gamma_lr=0.0),
                      "marthe-learned-mu": {}, "marthe": dict(lr=0.1, base="momentum", hypergrad_lr=0.0,
                                                              adapt_hypergrad_lr=1e-6),
                      "adam": dict(lr=1e-3)},
          sources={"cam-hd-adam fixed-gamma": "cam-hd-adam"}, learned=("cam-hd-learned-gamma", "marthe-learned-mu"),
          reference="cam-hd-learned-gamma", splits=("val", "test"),
          references={"marthe": "marthe-learned-mu", "marthe-learned-mu": "marthe-learned-mu"},
          description="Learned rules (metaopt.learned.rules; meta-trained on the mlp-cnn family: sigmoid / ReLU MLPs, "
                      "FFNN [100, 100], CNN-1) on held-out tasks: ELU and tanh MLPs, CNN-2, LeNet-5, 1000 steps "
                      "(5x the meta-training horizon). cam-hd-learned-gamma (CAM-HD Alg. 1 with gamma from a network) "
                      "vs CAM-HD-Adam with the delta rule and with fixed gamma (what the network starts from); "
                      "marthe-learned-mu (MARTHE App. B h_mu plus a learned correction) vs MARTHE over heavy ball "
                      "(Sec. 6 settings: eta_0 0.1, beta_0 = 0, adaptive beta 1e-6). 10 seeds (our choice).",
          quick_tasks=("mlp-tanh", "lenet5")),
]

# ----------------------------------------------------------------------------------------------------------------------
# The shipped learned optimizers on tasks that neither a suite nor a meta-training family contains (issue 12's
# held-out target: parity or better with Adam at its rate chosen in hindsight, at the learned optimizer's own step)

HELDOUT_TASKS = (
    TaskSpec("mlp-elu-40", "mlp-elu", {"hidden": 40}),            # Table 1's activations at other widths
    TaskSpec("mlp-sigmoid-50", "mlp-sigmoid", {"hidden": 50}),
    TaskSpec("mlp-tanh-3x24", "mlp-deep", {"depth": 3, "hidden": 24, "activation": "tanh"}),
    TaskSpec("ffnn-64-relu", "ffnn", {"hidden": (64,)}),
    TaskSpec("cnn-1-6x12", "cnn-1", {"channels": (6, 12)}),      # a CNN-1 of other widths
    TaskSpec("lstm-sine-16", "lstm-sine", {"hidden": 16}),       # the LSTM sine task at another width
    TaskSpec("quadratic-50", "quadratic", {"dim": 50}),
)

_HELDOUT_SUITES = [
    Suite("learned-heldout", HELDOUT_TASKS, 100, seeds=10,
          optimizers={**{name: {} for name in HYPERADAM_LEARNED}, "adam": {"lr": 1e-3}},
          learned=HYPERADAM_LEARNED, reference="adam", tune={"adam": LR_GRIDS["adam"]}, tune_in_hindsight=True,
          description="The shipped learned optimizers at their own step size on tasks that no suite and no "
                      "meta-training family contains (MLPs of other widths and depths, a one-layer ReLU FFNN, a "
                      "CNN-1 of other widths, the LSTM sine task with 16 units, a 50-dimensional quadratic), 100 "
                      "steps, against Adam with its learning rate chosen in hindsight per task (the √2-refined grid "
                      "searched on the evaluation seeds themselves). 10 seeds (our choice). Fashion-MNIST.",
          quick_tasks=("mlp-elu-40", "quadratic-50")),
]

SUITES: dict[str, Suite] = {s.name: s for s in (*_HYPERADAM_SUITES, *_CAMHD_SUITES, *_TLR_SUITES, *_MARTHE_SUITES,
                                                 *_LEARNED_RULES_SUITES, *_HELDOUT_SUITES)}
