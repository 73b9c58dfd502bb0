"""The meta-training loop: a meta-gradient estimator (truncated BPTT by default) over a task distribution, with exact
resume.

Read top to bottom, one meta-step is::

    reset the slots that reached the horizon T (fresh instance: configuration, draws, initialization, batches)
    the estimator (:mod:`.estimators`) advances every slot K inner steps and leaves the meta-gradient in theta's .grad;
        TruncatedBPTT: for each group of slots sharing a task configuration, unroll K inner steps (vectorized);
        meta_loss = mean over instances; backward; the state carried on is DETACHED (the truncation boundary)
    (all-reduce across ranks); skip if not finite; clip; Adam on theta
    carry each instance's parameters and optimizer state to the next truncation; reset diverged instances

Everything random comes from seeds derived from ``config.seed``: an instance is rebuilt exactly from its
``instance_seed``, so the training state file (written atomically every ``checkpoint_every`` steps, at the end and on
SIGINT / SIGTERM) resumes a run bit for bit. Distributed (``torchrun``): rank r owns the global slots
r·K/W … (r+1)·K/W − 1, so a W-process run sees the same instances as a single process with the same total meta-batch;
meta-gradients are averaged with an all-reduce and rank 0 logs and writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

import meta_tasks
import metaopt.meta.inner as inner
from meta_tasks.base import Task, TaskFamily, TransformedFamily
from meta_tasks.tricks import hyperadam_tricks
from metaopt.environment import time_left
from metaopt.learned.base import LEARNED_NAMES, CoordinatewiseOptimizer, LearnedOptimizer, is_class_name
from metaopt.meta.config import MetaConfig
from metaopt.meta.estimators import MetaGradientEstimator, TruncatedBPTT
from metaopt.meta.unroll import Slot

STATE_FILE = "state.pt"
# Version 2 stores a slot's optimizer state as the list of its pytree leaves (any pytree of tensors, restored into the
# structure lopt.init builds); version 1 stored {field: {name: tensor}} of a NamedTuple of dicts, and is still read.
STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)
CAMPAIGN_VERSION = 1  # the campaign file holds no optimizer state: unchanged by the training state's version 2
RESUMABLE_CHANGES = {"meta_steps", "checkpoint_every", "log_every", "fused", "compile"}  # not the maths


class TrainingStateError(RuntimeError):
    """The run directory's training state cannot be resumed (corrupt, or from a different configuration)."""


def instance_seed(seed: int, slot: int, generation: int) -> int:
    """The seed of the ``generation``-th instance of global slot ``slot``: independent of the number of ranks."""
    return (seed * 1_000_003 + slot * 7_919 + generation * 104_729 + 17) % (2**62)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(device)


def build_optimizer(config: MetaConfig) -> LearnedOptimizer:
    """The learned optimizer ``config`` names, its θ initialized from ``config.seed`` (global RNG left untouched)."""
    if not is_class_name(config.optimizer):
        valid = ", ".join(n for n in LEARNED_NAMES if is_class_name(n))
        if config.optimizer in LEARNED_NAMES:
            cls = LEARNED_NAMES[config.optimizer]
            raise ValueError(f"{config.optimizer!r} names pretrained weights of {cls.__name__}, not an optimizer to "
                             f"meta-train: use --optimizer {cls.registry_name}. Valid names: {valid}")
        raise ValueError(f"Unknown learned optimizer {config.optimizer!r}. Valid names: {valid}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return LEARNED_NAMES[config.optimizer](**config.optimizer_options())


def restore_opt_state(saved: Any, fresh: Any, version: int, where: str) -> Any:
    """A slot's optimizer state from the training state file, in the structure of ``fresh``, the state the learned
    optimizer builds for the slot's instance (``lopt.init``): version 2 saved the list of its pytree leaves, version 1
    ``{field: {name: tensor}}`` of a NamedTuple of dicts (HyperAdam, DMoptimizer, RNNprop). Every saved tensor must
    have the shape and dtype of the leaf it replaces; otherwise :class:`TrainingStateError` (``where`` names the file
    and slot): the state was written for another optimizer configuration or state layout."""
    paths = [keystr(path) for path, _ in tree_flatten_with_path(fresh)[0]]
    leaves, spec = tree_flatten(fresh)
    if version == 1:
        fields = getattr(fresh, "_fields", None)
        if (fields is None or not all(isinstance(v, dict) for v in fresh) or not isinstance(saved, dict)
                or list(saved) != list(fields)
                or any(not isinstance(saved[f], dict) or set(saved[f]) != set(v) for f, v in zip(fields, fresh))):
            raise TrainingStateError(
                f"{where}: the optimizer state was saved in version 1's layout ({{field: {{name: tensor}}}} of fields "
                f"{list(saved) if isinstance(saved, dict) else type(saved).__name__}), which this optimizer's state "
                f"({type(fresh).__name__}) no longer has; start the run over (or resume it with the metaopt that "
                "wrote it)")
        saved = [saved[f][n] for f, v in zip(fields, fresh) for n in v]  # the fresh state's leaf order
    if not isinstance(saved, list) or len(saved) != len(leaves):
        count = len(saved) if isinstance(saved, list) else type(saved).__name__
        raise TrainingStateError(f"{where}: the saved optimizer state has {count} tensors, {type(fresh).__name__} "
                                 f"builds {len(leaves)} for this instance (another optimizer configuration or state "
                                 "layout); start the run over")
    for path, want, got in zip(paths, leaves, saved):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            found = (f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__)
            raise TrainingStateError(f"{where}: optimizer state{path} was saved as {found}, but this run builds "
                                     f"{tuple(want.shape)} {want.dtype} (another optimizer configuration or state "
                                     "layout); start the run over")
    return tree_unflatten(saved, spec)


class MetaTrainer:
    """Meta-trains ``lopt`` under ``config``; ``run_dir`` holds config.json, state.pt, log.jsonl, best/ and last/.

    Args:
        config: the run's configuration.
        run_dir: where the run lives (created); ``resume=True`` continues the state found there.
        device: a torch device for the learners, the data and theta.
        logger: called with a dict of metrics after every meta-step (console / wandb); rank 0 only.
        family / val_family: task families to use instead of the ones ``config`` names (tests).
        estimator: how a meta-step's meta-gradient is made (default: :class:`TruncatedBPTT` with ``config``'s
            truncation and unroll options). It is not part of the training state: resume a run with the same one.
    """

    def __init__(self, config: MetaConfig, run_dir: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                 resume: bool = False, logger: Callable[[dict[str, Any]], None] | None = None,
                 family: TaskFamily | None = None, val_family: TaskFamily | None = None,
                 estimator: MetaGradientEstimator | None = None):
        self.config, self.run_dir = config, Path(run_dir)
        self.device = torch.device(device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if config.meta_batch % self.world:
            raise ValueError(f"meta_batch {config.meta_batch} must be divisible by the number of processes "
                             f"{self.world}")
        self.logger = logger
        plain = family or meta_tasks.get_family(config.family, dataset=config.dataset, device=self.device)
        self.val_family = val_family or plain
        self.family = TransformedFamily(
            plain, lambda task, gen: hyperadam_tricks(task, gen, config.rs_learner, config.rs_convex, config.convex_k,
                                                      config.convex_style, config.learner_init_std))
        self.lopt = build_optimizer(config).to(self.device)
        self.outer = torch.optim.Adam(self.lopt.parameters(), lr=config.outer_lr)
        self.estimator = estimator if estimator is not None else TruncatedBPTT()
        self.meta_step, self.skipped, self.best_score = 0, 0, math.inf
        self.quiet = False  # True: no progress bar and no progress lines (train_meta.py --quiet)
        self.initial_score = math.inf  # θ's validation score before its first meta-step
        local = config.meta_batch // self.world
        self.slot_ids = list(range(self.rank * local, (self.rank + 1) * local))
        self.slots = [self._new_slot(i, 0, offset=self._offset(i)) for i in self.slot_ids]
        self._stop_signal: int | None = None
        if resume:
            self.load_state()

    # -- instances ---------------------------------------------------------------------------------------------------

    def _offset(self, slot: int) -> int:
        """Staggered start: slot i begins (i mod T/K) truncations into its horizon, so resets spread out."""
        per_horizon = self.config.horizon // self.config.truncation
        return (slot % per_horizon) * self.config.truncation

    def _new_slot(self, slot: int, generation: int, offset: int = 0) -> Slot:
        seed = instance_seed(self.config.seed, slot, generation)
        gen = torch.Generator().manual_seed(seed)
        task = self.family.sample(gen)
        params = task.init(gen)
        batch_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        return Slot(seed, task, params, self.lopt.init(params), offset, batch_gen, generation)

    # -- one meta-step -----------------------------------------------------------------------------------------------

    def meta_step_once(self) -> dict[str, Any]:
        config = self.config
        for i, slot in enumerate(self.slots):
            if slot.step >= config.horizon:
                self.slots[i] = self._new_slot(self.slot_ids[i], slot.generation + 1)
        start = time.perf_counter()
        self.outer.zero_grad(set_to_none=False)
        estimate = self.estimator.estimate(self.lopt, self.slots, config)
        grads = [p.grad for p in self.lopt.parameters()]
        stats = torch.stack([estimate.meta_loss, torch.tensor(estimate.inner_loss, device=estimate.meta_loss.device)])
        if self.world > 1:
            for g in grads:
                dist.all_reduce(g)
                g.div_(self.world)
            dist.all_reduce(stats)
            stats /= self.world
        finite = bool(torch.isfinite(stats[0])) and all(bool(torch.isfinite(g).all()) for g in grads)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.lopt.parameters(), config.grad_clip or math.inf))
        if finite:
            for group in self.outer.param_groups:
                group["lr"] = config.outer_lr_at(self.meta_step)
            self.outer.step()
        else:
            self.skipped += 1  # neither theta nor Adam's moments see a non-finite meta-gradient

        # The estimator carries each instance on across the truncation boundary (detached).
        for i, (params, opt_state) in enumerate(zip(estimate.params, estimate.opt_states, strict=True)):
            slot = self.slots[i]
            slot.params, slot.opt_state = params, opt_state
            slot.step += config.truncation
            if not all(bool(torch.isfinite(p).all()) for p in slot.params.values()):
                self.slots[i] = self._new_slot(self.slot_ids[i], slot.generation + 1)  # diverged: start afresh
        self.meta_step += 1
        seconds = time.perf_counter() - start
        return {"meta_step": self.meta_step, "meta_loss": float(stats[0]), "inner_loss": float(stats[1]),
                "grad_norm": grad_norm, "skipped": self.skipped, "outer_lr": config.outer_lr_at(self.meta_step - 1),
                "inner_steps_per_s": config.truncation * config.meta_batch / seconds}

    # -- validation --------------------------------------------------------------------------------------------------

    def validate(self) -> float:
        """Mean final training loss (``val_score="log-mean"``: mean log) of θ, frozen, over ``val_tasks`` held-out
        instances: plain tasks without the training tricks, seeds disjoint from training, each run for ``horizon``
        steps through the optimizer's ``torch.optim`` face exactly as users run it (so a rule that needs closures,
        like marthe-learned-mu, is validated with its real oracles), on the eager step (``compile=False``: a fresh copy
        of θ each time would compile anew, and the scores of a campaign stay comparable across pieces). Lower is
        better; a diverged run scores +inf."""
        frozen = copy.deepcopy(self.lopt)  # the face freezes the module it is given; θ itself keeps training
        face = {"compile": False} if isinstance(frozen, CoordinatewiseOptimizer) else {}
        finals = []
        for i in range(self.config.val_tasks):
            seed = instance_seed(self.config.seed + 1_000_000_007, i, 0) % 2**31  # small: train() scales it
            task: Task = self.val_family.sample(torch.Generator().manual_seed(seed))
            run = inner.train(task, "validation", {"lr": self.config.lr}, seed, self.config.horizon, source=frozen,
                              splits=(), face_options=face)
            finals.append(run.losses[-1])
        if self.config.val_score == "log-mean":
            # a NaN (diverged) instance scores +inf like a diverged one in the mean; a loss of exactly 0 cannot be beaten
            finals = [math.inf if math.isnan(f) else math.log(f) if f > 0 else -math.inf for f in finals]
        score = sum(finals) / len(finals)
        return score if math.isfinite(score) or score == -math.inf else math.inf

    # -- the loop ----------------------------------------------------------------------------------------------------

    def run(self, progress: bool | None = None, max_seconds: float | None = None) -> dict[str, Any]:
        """Meta-train until ``config.meta_steps`` (or until ``max_seconds`` of wall time have passed: the state is
        saved and the run resumes with ``resume=True``); returns the last metrics. Writes state, last/ and best/."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        self._clock = (time.monotonic(), self.meta_step, deadline)  # for the progress lines' time left
        config = self.config
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        handlers = self._install_signal_handlers()
        bar = None
        if progress is None:
            progress = self.rank == 0 and sys.stderr.isatty() and not self.quiet
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=config.meta_steps, initial=self.meta_step, desc="meta-training", dynamic_ncols=True)
        metrics: dict[str, Any] = {}
        initial: dict[str, Any] = {}
        if config.val_every and self.meta_step == 0 and self.best_score == math.inf:
            # θ before any meta-step is a candidate too: a learned rule that starts at its hand-designed version
            # (cam-hd-learned-gamma, marthe-learned-mu) exports that start unless training beats it on validation.
            self.best_score = self.initial_score = self.validate()
            if self.rank == 0:
                self.lopt.save_pretrained(self.run_dir / "best")
            initial = {"initial_val_score": self.best_score}
        try:
            while self.meta_step < config.meta_steps and self._stop_signal is None:
                if deadline is not None and time.monotonic() > deadline:
                    break
                metrics = {**self.meta_step_once(), **initial}
                initial = {}
                if config.val_every and self.meta_step % config.val_every == 0:
                    metrics["val_score"] = self.validate()
                    if metrics["val_score"] < self.best_score and self.rank == 0:
                        self.best_score = metrics["val_score"]
                        self.lopt.save_pretrained(self.run_dir / "best")
                    metrics["best_val_score"] = self.best_score
                self._log(metrics, bar)
                if self.meta_step % config.checkpoint_every == 0:
                    self.save_state()
        finally:
            self.save_state()
            if self.rank == 0:
                self.lopt.save_pretrained(self.run_dir / "last")
            if bar is not None:
                bar.close()
            self._restore_signal_handlers(handlers)
        if self._stop_signal is not None:
            raise KeyboardInterrupt(f"stopped by signal {self._stop_signal} at meta-step {self.meta_step}; "
                                    f"the state is saved in {self.run_dir / STATE_FILE} (resume with --resume)")
        return metrics

    def _log(self, metrics: dict[str, Any], bar) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.logger is not None:
            self.logger(metrics)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}", inner=f"{metrics['inner_loss']:.4f}",
                            steps_s=f"{metrics['inner_steps_per_s']:.0f}")
        elif not self.quiet and (self.meta_step % self.config.log_every == 0
                                 or self.meta_step == self.config.meta_steps):
            extra = f" val {metrics['val_score']:.4f}" if "val_score" in metrics else ""
            started, first, deadline = self._clock
            now = time.monotonic()
            left = time_left(now - started, self.meta_step - first, self.config.meta_steps - first,
                             None if deadline is None else deadline - now)
            print(f"meta-step {self.meta_step}/{self.config.meta_steps}: meta-loss {metrics['meta_loss']:.4f} "
                  f"inner loss {metrics['inner_loss']:.4f} ({metrics['inner_steps_per_s']:.0f} inner steps/s)"
                  f"{extra}{', ' + left if left and left != 'done' else ''}", file=sys.stderr, flush=True)

    def _install_signal_handlers(self):
        if self.rank != 0 and not dist.is_initialized():
            return {}
        try:
            def stop(signum, frame):
                self._stop_signal = signum

            return {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            return {}

    @staticmethod
    def _restore_signal_handlers(handlers) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)

    # -- the training state ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        slots = [{"instance_seed": s.instance_seed, "generation": s.generation, "step": s.step,
                  "params": s.params, "opt_state": tree_flatten(s.opt_state)[0],
                  "batch_gen": s.batch_gen.get_state()} for s in self.slots]
        return {"version": STATE_VERSION, "config": self.config.to_dict(), "meta_step": self.meta_step,
                "skipped": self.skipped, "best_score": self.best_score, "initial_score": self.initial_score,
                "theta": self.lopt.state_dict(),
                "outer": self.outer.state_dict(), "slots": slots}

    def save_state(self) -> None:
        """Write the training state atomically (temp file + rename); each rank writes its own slots' file."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self._state_path()
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def _state_path(self) -> Path:
        return self.run_dir / (STATE_FILE if self.world == 1 else f"state.rank{self.rank}.pt")

    def load_state(self) -> None:
        path = self._state_path()
        if not path.is_file():
            raise TrainingStateError(f"--resume: no training state at {path}; start without --resume")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:  # a truncated or corrupt file: never a silent restart
            raise TrainingStateError(f"{path}: corrupt training state ({type(err).__name__}: {err}). Delete it to "
                                     "start over, or restore it from a copy.") from None
        if not isinstance(state, dict) or state.get("version") not in READABLE_STATE_VERSIONS:
            raise TrainingStateError(f"{path}: not a metaopt training state of version "
                                     f"{' or '.join(map(str, READABLE_STATE_VERSIONS))}")
        if state["config"] != self.config.to_dict():
            changed = self.config.changes_from(state["config"])
            if set(changed) - RESUMABLE_CHANGES:
                raise TrainingStateError(f"{path}: the run was started with a different configuration "
                                         f"(differs in {changed}); resume with the same flags")
        self.lopt.load_state_dict(state["theta"])
        self.outer.load_state_dict(state["outer"])
        self.meta_step, self.skipped, self.best_score = state["meta_step"], state["skipped"], state["best_score"]
        self.initial_score = state.get("initial_score", math.inf)
        for i, saved in enumerate(state["slots"]):
            slot = self._new_slot(self.slot_ids[i], saved["generation"])
            if slot.instance_seed != saved["instance_seed"]:
                raise TrainingStateError(f"{path}: slot {i} does not match this run's seeds")
            slot.params = saved["params"]
            slot.opt_state = restore_opt_state(saved["opt_state"], slot.opt_state, state["version"],
                                               f"{path}: slot {i}")
            slot.step = saved["step"]
            slot.batch_gen.set_state(saved["batch_gen"].cpu())
            self.slots[i] = slot

    # -- the campaign state: what a fresh machine needs to continue a run ----------------------------------------------

    def campaign_state(self) -> dict[str, Any]:
        """The run without its inner instances: θ, the outer optimizer's state, the counters, the validation scores
        and each slot's instance generation (~3x θ's size: tens of kB for HyperAdam). :meth:`load_campaign` continues
        from it with every slot at a fresh instance of its next generation — an instance restarted at the start of
        its horizon, which is the only difference to resuming from the full training state."""
        if self.world > 1:
            raise TrainingStateError("campaign states are written by single-process runs")
        return {"version": CAMPAIGN_VERSION, "kind": "campaign", "config": self.config.to_dict(),
                "meta_step": self.meta_step, "skipped": self.skipped, "best_score": self.best_score,
                "initial_score": self.initial_score, "theta": self.lopt.state_dict(), "outer": self.outer.state_dict(),
                "generations": [s.generation for s in self.slots]}

    def save_campaign(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`campaign_state` to ``path`` atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.campaign_state(), tmp)
        os.replace(tmp, path)

    def load_campaign(self, path: str | os.PathLike[str]) -> None:
        """Continue the campaign saved at ``path`` (same configuration; ``meta_steps`` and the other
        :data:`RESUMABLE_CHANGES` may differ)."""
        path = Path(path)
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:
            raise TrainingStateError(f"{path}: corrupt campaign state ({type(err).__name__}: {err}). Restore it from "
                                     "git, or start the campaign over without it.") from None
        if not isinstance(state, dict) or state.get("kind") != "campaign" or state.get("version") != CAMPAIGN_VERSION:
            raise TrainingStateError(f"{path}: not a metaopt campaign state of version {CAMPAIGN_VERSION}")
        changed = self.config.changes_from(state["config"])
        if set(changed) - RESUMABLE_CHANGES:
            raise TrainingStateError(f"{path}: the campaign was run with a different configuration (differs in "
                                     f"{changed}); continue it with the same flags")
        if len(state["generations"]) != len(self.slots):
            raise TrainingStateError(f"{path}: {len(state['generations'])} slots saved, this run has "
                                     f"{len(self.slots)} (meta_batch must stay the same)")
        self.lopt.load_state_dict(state["theta"])
        self.outer.load_state_dict(state["outer"])
        self.meta_step, self.skipped = state["meta_step"], state["skipped"]
        self.best_score, self.initial_score = state["best_score"], state["initial_score"]
        self.slots = [self._new_slot(i, g + 1, offset=self._offset(i))
                      for i, g in zip(self.slot_ids, state["generations"])]
