"""The ``faces`` section of ``python -m metaopt.bench``: what a user pays for swapping ``torch.optim`` for a metaopt
optimizer, as the ratio of two step times measured side by side (issue "Speed on the machine we have").

Every registered optimizer is built the way a user builds it (``metaopt.make_optimizer(name, named_parameters)`` at
its registered defaults: the learned ones load their shipped checkpoint and take their default path) over two
learners, the MLP 784-20-10 of HyperAdam's meta-training (15,910 parameters) and an MLP 784-256-256-256-10 (0.34 M),
and timed against a baseline in alternating calls (baseline, candidate, baseline, ...), so that both see the same
machine load and the ratio of their medians is steady even on a busy CPU:

- a classic name (``sgd``, ``adam``, ...) against its ``torch.optim`` counterpart with ``foreach=True``
  (target ≤ 1.1×);
- the HD family against its base torch optimizer (≤ 1.3×); CAM-HD and TLR likewise (≤ 2×);
- an optimizer whose step takes a closure (MARTHE, RTHO, HD-val, TLR-naive, the learned μ) as a whole
  ``opt.step(closure)`` against one SGD training iteration of the same batch (forward, backward and torch's SGD step;
  MARTHE and RTHO ≤ 3×);
- the parameter-free baselines against torch's Adam (``dog`` against SGD), with no target;
- a coordinatewise learned optimizer (HyperAdam, DMoptimizer, RNNprop) against its compute floor: the FLOPs of its
  networks per coordinate (2 per weight of every matrix, each applied once per coordinate and step: 10,440 for
  HyperAdam at J = 20) times the learner's coordinates, over the float32 GEMM rate this machine reaches on a large
  square matrix product with the same threads (≤ 2×). The floor is optimistic on purpose: the cell's small matrices
  (20 × 80) and its element-wise work do not run at the peak rate.

Every optimizer steps on the same fixed random gradients (N(0, 1e-4)); the closure steps on one random batch of 128.
Optimizers with a compiled step (the HD family, CAM-HD, the coordinatewise learned ones) get a second row,
``name[compiled]`` (``compile=True``; compiled by its warm-up calls, so the time is the steady state's). Targets are
judged (``passed``) per row on full runs on any device; a ``--quick`` run (the small MLP, few repeats, nothing
compiled) lists them unjudged.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import metaopt
from meta_tasks import models
from metaopt.bench.timing import GRAD_SCALE, closure_step, format_seconds, summarize, synchronize
from metaopt.core import step_needs
from metaopt.learned import LEARNED_NAMES, FrozenLearnedOptimizer
from metaopt.registry import record

BATCH_SIZE = 128
GEMM_SIZE = 1024  # the square matrix product whose rate is the learned optimizers' compute floor

FACE_LEARNERS: dict[str, Callable[[], nn.Module]] = {
    "mlp-784-20-10": lambda: models.MLP(784, 20, 1, 10, "sigmoid"),
    "mlp-784-256x3-10": lambda: models.MLP(784, 256, 3, 10, "relu"),
}
QUICK_LEARNERS = ("mlp-784-20-10",)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """What a face's step is compared with: a ``torch.optim`` optimizer (``build`` over the parameters), one SGD
    training iteration (``iteration``), or the compute floor (``floor``). ``minimal``: the registered name of the
    same update where torch's implementation moves exactly the floats of that name's memory model (so that a ratio
    below :func:`traffic_bound` is out of reach), None where it moves more or is not an optimizer step."""

    name: str
    build: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None
    iteration: bool = False
    floor: bool = False
    minimal: str | None = None


def _torch(name: str, cls: type[torch.optim.Optimizer], minimal: str | None = None, **kwargs: Any) -> Baseline:
    return Baseline(name, lambda params: cls(params, foreach=True, **kwargs), minimal=minimal)


# torch's foreach SGD without momentum is one _foreach_add_ (p, g read, p written: the 3 floats any SGD step moves);
# with momentum it makes three passes (8 floats against the 5 of its model), and its foreach Adam more than the 7 of
# Adam's, which is how metaopt's fused steps can beat them: no bound is claimed against those.
TORCH_SGD = _torch("torch SGD", torch.optim.SGD, minimal="sgd", lr=1e-3)
TORCH_NESTEROV = _torch("torch SGD (Nesterov 0.9)", torch.optim.SGD, lr=1e-3, momentum=0.9, nesterov=True)
TORCH_ADAM = _torch("torch Adam", torch.optim.Adam, lr=1e-3)
SGD_ITERATION = Baseline("SGD iteration (forward, backward, torch SGD step)", iteration=True)
COMPUTE_FLOOR = Baseline("compute floor", floor=True)

TORCH_COUNTERPARTS: dict[str, Baseline] = {
    "sgd": TORCH_SGD,
    "momentum": _torch("torch SGD (momentum 0.9)", torch.optim.SGD, lr=1e-3, momentum=0.9),
    "nesterov": TORCH_NESTEROV,
    "adam": TORCH_ADAM,
    "rmsprop": _torch("torch RMSprop", torch.optim.RMSprop, lr=1e-2),
    "adagrad": _torch("torch Adagrad", torch.optim.Adagrad, lr=1e-2),
    "adadelta": _torch("torch Adadelta", torch.optim.Adadelta, lr=1.0),
}
# name -> (baseline, target limit on the ratio or None): the targets
COMPARISONS: dict[str, tuple[Baseline, float | None]] = {
    **{name: (baseline, 1.1) for name, baseline in TORCH_COUNTERPARTS.items()},
    "sgd-hd": (TORCH_SGD, 1.3), "sgdn-hd": (TORCH_NESTEROV, 1.3), "adam-hd": (TORCH_ADAM, 1.3),
    "cam-hd-sgd": (TORCH_SGD, 2.0), "cam-hd-sgdn": (TORCH_NESTEROV, 2.0), "cam-hd-adam": (TORCH_ADAM, 2.0),
    "tlr": (TORCH_SGD, 2.0), "tlr-pl": (TORCH_SGD, 2.0),
    "marthe": (SGD_ITERATION, 3.0), "rtho": (SGD_ITERATION, 3.0),
    "hd-val": (SGD_ITERATION, None), "tlr-naive": (SGD_ITERATION, None), "marthe-learned-mu": (SGD_ITERATION, None),
    "cam-hd-learned-gamma": (TORCH_ADAM, None),
    "schedule-free-adamw": (TORCH_ADAM, None), "prodigy": (TORCH_ADAM, None), "d-adapt-adam": (TORCH_ADAM, None),
    "mechanic-adam": (TORCH_ADAM, None), "dog": (TORCH_SGD, None),
}
COORDINATEWISE_LIMIT = 2.0  # the learned optimizers' default step within 2× of its compute floor
# Optimizers timed a second time with compile=True (row "name[compiled]").
COMPILED_VARIANT = frozenset({"sgd-hd", "sgdn-hd", "adam-hd", "cam-hd-sgd", "cam-hd-sgdn", "cam-hd-adam", "hyperadam",
                              "hyperadam-general", "dm", "rnnprop"})


def comparison(name: str) -> tuple[Baseline, float | None]:
    """The baseline of ``name`` and its target limit (None: reported without a target). A coordinatewise learned
    optimizer is compared with its compute floor."""
    if name in COMPARISONS:
        return COMPARISONS[name]
    if name in LEARNED_NAMES:
        return COMPUTE_FLOOR, COORDINATEWISE_LIMIT
    raise KeyError(f"no baseline for optimizer {name!r}: add it to metaopt.bench.faces.COMPARISONS")


def traffic_bound(name: str) -> float | None:
    """The least ratio to its baseline that the step of ``name`` can reach on any machine where both are
    memory-bound: the floats per coordinate its update must move over those its baseline moves (the registry
    records' :class:`~metaopt.registry.MemoryModel`), e.g. SGD-HD's 7 (p, g, d_prev read for <g, d_prev> and the
    update, p and d_prev written) over torch SGD's 3 = 2.33. None where ``name`` has no model or its baseline moves
    more than its model (``Baseline.minimal``). The models count the algorithms, not a face's non-finite screen (one
    more read of g where a face does not fold it into a reduction it makes anyway: plain SGD's 4 / 3)."""
    baseline, _ = comparison(name.removesuffix("[compiled]"))
    if baseline.minimal is None:
        return None
    ours, theirs = record(name.removesuffix("[compiled]")).memory, record(baseline.minimal).memory
    if ours is None or theirs is None:
        return None
    return ours.floats_per_coordinate / theirs.floats_per_coordinate


def flops_per_coordinate(opt: torch.optim.Optimizer) -> float | None:
    """2 FLOPs per weight of every matrix of a coordinatewise learned optimizer's networks (each matrix is applied once
    per coordinate and step), or None for an optimizer without such networks. Biases and element-wise work are left
    out: the floor is a lower bound."""
    if not isinstance(opt, FrozenLearnedOptimizer):
        return None
    return float(2 * sum(p.numel() for p in opt.lopt.parameters() if p.dim() >= 2))


def gemm_flops_per_s(device: torch.device, repeats: int) -> dict[str, Any]:
    """The float32 rate of a ``GEMM_SIZE``² matrix product on ``device`` with torch's current threads."""
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device)
    samples = []
    for i in range(repeats + 2):
        synchronize(device)
        begin = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if i >= 2:
            samples.append(time.perf_counter() - begin)
    stats = summarize(samples)
    return {"size": GEMM_SIZE, "time_s": stats, "flops_per_s": 2 * GEMM_SIZE**3 / stats["median_s"]}


def paired_times(candidate: Callable[[], Any], baseline: Callable[[], Any], device: torch.device, repeats: int,
                 warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Timing statistics of ``candidate`` and ``baseline``, called alternately ``repeats`` times each after
    ``warmup`` untimed calls of each."""
    for _ in range(warmup):
        baseline()
        candidate()
    samples: dict[str, list[float]] = {"candidate": [], "baseline": []}
    for _ in range(repeats):
        for which, fn in (("baseline", baseline), ("candidate", candidate)):
            synchronize(device)
            begin = time.perf_counter()
            fn()
            synchronize(device)
            samples[which].append(time.perf_counter() - begin)
    return summarize(samples["candidate"]), summarize(samples["baseline"])


def _sgd_iteration(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], Any]:
    opt = TORCH_SGD.build(list(model.parameters()))

    def iteration() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()

    return iteration


def _set_grads(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def face_row(name: str, learner: str, base: nn.Module, device: torch.device, repeats: int, warmup: int,
             gemm_rate: float, seed: int, compiled: bool = False) -> dict[str, Any]:
    """One optimizer on one learner (``compile=True`` with ``compiled``): its step time, its baseline's, their ratio
    and the target."""
    baseline, limit = comparison(name)
    generator = torch.Generator(device=device).manual_seed(seed)
    model, other = copy.deepcopy(base).to(device), copy.deepcopy(base).to(device)
    params = list(model.parameters())
    grads = [torch.randn(p.shape, generator=generator, device=device) * GRAD_SCALE for p in params]
    batch = (torch.randn(BATCH_SIZE, 784, generator=generator, device=device),
             torch.randint(10, (BATCH_SIZE,), generator=generator, device=device))
    opt = metaopt.make_optimizer(name, list(model.named_parameters()), **({"compile": True} if compiled else {}))
    closure = step_needs(opt)[0]
    _set_grads(params, grads)
    step = closure_step(opt, model, batch, batch) if closure else opt.step
    label = f"{name}[compiled]" if compiled else name
    row: dict[str, Any] = {"key": f"faces:{label}:{learner}", "optimizer": label, "learner": learner,
                           "num_params": sum(p.numel() for p in params), "includes_closure": closure,
                           "baseline": baseline.name}
    if baseline.floor:
        flops = flops_per_coordinate(opt)
        if flops is None:
            raise TypeError(f"{name}: compared with a compute floor but has no coordinatewise network")
        row["flops_per_coordinate"] = flops
        row["floor_s"] = flops * row["num_params"] / gemm_rate
        stats, _ = paired_times(step, lambda: None, device, repeats, warmup)
        row["time_s"] = stats
        row["ratio"] = stats["median_s"] / row["floor_s"]
    else:
        if baseline.iteration:
            reference = _sgd_iteration(other, batch)
        else:
            reference = baseline.build(list(other.parameters()))
            _set_grads(list(other.parameters()), grads)
            reference = reference.step
        stats, base_stats = paired_times(step, reference, device, repeats, warmup)
        row.update(time_s=stats, baseline_time_s=base_stats, ratio=stats["median_s"] / base_stats["median_s"])
    if isinstance(opt, FrozenLearnedOptimizer):  # the default face compiles large groups on a CPU (compile="auto")
        row["compiled_step"] = opt.compiled
    if limit is not None:
        row["target"] = {"limit": limit, "text": f"≤ {limit:g}× {'floor' if baseline.floor else 'baseline'}"}
    return row


def judge(row: dict[str, Any], quick: bool) -> None:
    """``row["passed"]``: whether its ratio meets its target (None on a quick run, whose sizes and repeats are not the
    target's); nothing for a row without a target."""
    if "target" in row:
        row["passed"] = None if quick else bool(row["ratio"] <= row["target"]["limit"])


def faces_section(device: torch.device, repeats: int, warmup: int, quick: bool, seed: int,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Every registered optimizer on :data:`FACE_LEARNERS` (the small one only with ``quick``): the section's rows,
    each judged against its target unless ``quick``."""
    gemm = gemm_flops_per_s(device, max(repeats, 5))
    learners = QUICK_LEARNERS if quick else tuple(FACE_LEARNERS)
    rows = []
    for learner in learners:
        torch.manual_seed(seed)
        base = FACE_LEARNERS[learner]()
        cases = [(name, compiled) for name in metaopt.OPTIMIZERS
                 for compiled in ((False, True) if name in COMPILED_VARIANT and not quick else (False,))]
        for name, compiled in cases:
            label = f"{name}[compiled]" if compiled else name
            log(f"faces: {label} on {learner}")
            try:
                row = face_row(name, learner, base, device, repeats, warmup, gemm["flops_per_s"], seed, compiled)
            except (torch.cuda.OutOfMemoryError, ImportError) as err:  # out of memory; a package this machine lacks
                row = {"key": f"faces:{label}:{learner}", "optimizer": label, "learner": learner,
                       "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
            except Exception as err:  # noqa: BLE001  a compiled variant that fails to build here: say so, go on
                if not compiled:
                    raise
                row = {"key": f"faces:{label}:{learner}", "optimizer": label, "learner": learner,
                       "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            judge(row, quick)
            rows.append(row)
    return {"learners": {name: FACE_LEARNERS[name]().__repr__().splitlines()[0] for name in learners},
            "gemm": gemm, "grad_scale": GRAD_SCALE, "batch_size": BATCH_SIZE, "rows": rows}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if "error" in row:
        return row["error"]
    verdict = {True: ", pass", False: ", FAIL", None: ""}[row.get("passed")]
    return f"{format_seconds(row['time_s']['median_s'])}, {row['ratio']:.3g}×{verdict}"


def faces_markdown(section: dict[str, Any]) -> list[str]:
    """The section as one Markdown table, one line per optimizer (and compiled variant): its baseline, then per
    learner its step time and its ratio to the baseline's step or to the compute floor, judged against the target."""
    learners = list(dict.fromkeys(r["learner"] for r in section["rows"]))
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    for r in section["rows"]:
        by_label.setdefault(r["optimizer"], {})[r["learner"]] = r
    lines = [f"Compute floor: {section['gemm']['flops_per_s'] / 1e9:,.0f} GFLOP/s (float32 {section['gemm']['size']}² "
             "matrix product). Each cell: the step's median time, its ratio to the baseline's step (or floor) timed "
             "beside it, and the verdict against the target. Traffic bound: the least ratio a memory-bound step can "
             "reach, the floats per coordinate its algorithm must move over its baseline's (registry memory models; "
             "\"unreachable\" where it exceeds the target).", "",
             "| optimizer | baseline | " + " | ".join(learners) + " | target | traffic bound |",
             "|---|---|" + "---|" * len(learners) + "---|---|"]
    for label, rows in by_label.items():
        first = next(iter(rows.values()))
        limit = next((r["target"]["limit"] for r in rows.values() if "target" in r), None)
        target = next((r["target"]["text"] for r in rows.values() if "target" in r), "–")
        step_kind = " (with closure)" if first.get("includes_closure") else ""
        bound = traffic_bound(label)
        bound_text = "–" if bound is None else f"{bound:.3g}×" + (", unreachable" if limit and bound > limit else "")
        lines.append(f"| {label}{step_kind} | {first.get('baseline', '–')} | "
                     + " | ".join(_cell(rows.get(learner)) for learner in learners) + f" | {target} | {bound_text} |")
    return lines
