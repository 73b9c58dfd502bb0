"""The sections of a run (:class:`Bench`): step, iteration, meta, table1 and faces."""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.bench.config import CUDA_VARIANTS, FRESH_LEARNED, LEARNED_VARIANTS, BenchConfig
from metaopt.bench.learners import (ADAM_REFERENCE, BASE_OPTIMIZER, LEARNERS, Learner, build_optimizer,
                                    compare_with_reference, _guard, _kind, optimizer_names, _random_batch, _release,
                                    _stored_state_floats)
from metaopt.bench.memory import CACHE_FLUSH_BYTES, PeakMemory, copy_bandwidth, learned_byte_model, roofline_seconds
from metaopt.bench.timing import GRAD_SCALE, closure_step, measure, summarize, synchronize
from metaopt.core import step_needs
from metaopt.evaluate import SUITES, evaluate_suite
from metaopt.learned import LearnedOptimizer
from metaopt.meta import MetaConfig, MetaTrainer, preset


class Bench:
    """One benchmark run on one device: the sections share the timing settings, the measured bandwidth and, on CUDA,
    the buffer that evicts L2 between timed calls of the step and iteration sections."""

    def __init__(self, config: BenchConfig, device: torch.device, log: Callable[[str], None] = lambda s: None):
        self.config, self.device, self.log = config, device, log
        self.repeats, self.warmup = config.num_repeats, config.num_warmup
        self.names, self.skipped = optimizer_names(device)
        self.variants = [v for v in config.learned_variants if device.type == "cuda" or v not in CUDA_VARIANTS]
        for variant in config.learned_variants:
            if variant not in self.variants:
                self.skipped.update({f"{name}[{variant}]": "needs a CUDA device"
                                     for name in self.names if name in FRESH_LEARNED})
        self.bandwidth: dict[str, Any] | None = None
        self._flush: torch.Tensor | None = None

    def time(self, fn: Callable[[], Any], repeats: int | None = None, warmup: int | None = None,
             flush_cache: bool = True) -> dict[str, float]:
        """:func:`measure` with this run's settings; ``flush_cache`` evicts L2 before each call on CUDA."""
        flush = None
        if flush_cache and self.device.type == "cuda":
            if self._flush is None:
                self._flush = torch.empty(CACHE_FLUSH_BYTES, dtype=torch.uint8, device=self.device)
            flush = self._flush
        return summarize(measure(fn, self.device, self.repeats if repeats is None else repeats,
                                 self.warmup if warmup is None else warmup, flush))

    def drop_flush_buffer(self) -> None:
        self._flush = None
        _release(self.device)

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.config.seed + offset)

    def cases(self) -> list[tuple[str, str, str | None]]:
        """(row name, optimizer, variant) of each timed case: a learned optimizer once per face variant, as
        ``hyperadam[flat]``; the others once, with variant None."""
        cases: list[tuple[str, str, str | None]] = []
        for name in self.names:
            if name in FRESH_LEARNED:
                cases += [(f"{name}[{variant}]", name, variant) for variant in self.variants]
            else:
                cases.append((name, name, None))
        return cases

    def learned_face(self, name: str, variant: str, model: nn.Module, check_offset: int
                     ) -> tuple[torch.optim.Optimizer, LearnedOptimizer, dict[str, Any]]:
        """A fresh learned optimizer ``name`` frozen over ``model`` in ``variant``, and what the row records about it:
        its variant and, for a fast variant, its :func:`compare_with_reference` check (3 steps already taken; the
        weights are restored afterwards, so every case still starts from the same ones)."""
        lopt = FRESH_LEARNED[name]()
        named = list(model.named_parameters())
        opt = lopt.frozen(named, **LEARNED_VARIANTS[variant])
        record: dict[str, Any] = {"learned": name, "variant": variant}
        if variant != "reference":
            weights = copy.deepcopy(model.state_dict())
            reference_model = copy.deepcopy(model)
            reference = lopt.frozen(list(reference_model.named_parameters()), **LEARNED_VARIANTS["reference"])
            record["check"] = compare_with_reference(opt, model, reference, reference_model,
                                                     self.generator(check_offset), f"{name}[{variant}]")
            del reference, reference_model
            model.load_state_dict(weights)
            _release(self.device)
        return opt, lopt, record

    # -- bandwidth -------------------------------------------------------------------------------------------------

    def measure_bandwidth(self) -> dict[str, Any]:
        self.log("bandwidth: device-to-device copy")
        self.bandwidth = copy_bandwidth(self.device, self.config.bandwidth_bytes, max(self.repeats, 5), self.warmup)
        return self.bandwidth

    # -- 1. frozen step against the roofline -----------------------------------------------------------------------

    def step_section(self) -> dict[str, Any]:
        bandwidth = self.bandwidth or self.measure_bandwidth()
        learners, rows = {}, []
        for learner_name in self.config.learners:
            learner = LEARNERS[learner_name]
            base, source = learner.build()
            num_params = sum(p.numel() for p in base.parameters())
            learners[learner_name] = {"num_params": num_params, "num_tensors": len(list(base.parameters())),
                                      "source": source}
            for row_name, name, variant in self.cases():
                self.log(f"step: {row_name} on {learner_name}")
                row = {"key": f"step:{row_name}:{learner_name}", "optimizer": row_name, "learner": learner_name,
                       "kind": _kind(name), "num_params": num_params}
                if variant is not None:
                    row.update(family=f"step:{name}:{learner_name}", variant=variant)
                rows.append(_guard(row, self.device, self._step_case, name, variant, learner, base, num_params,
                                   bandwidth["bytes_per_s"]))
            del base
            _release(self.device)
        return {"learners": learners, "grad_scale": GRAD_SCALE, "rows": rows}

    def _step_case(self, name: str, variant: str | None, learner: Learner, base: nn.Module, num_params: int,
                   bytes_per_s: float) -> dict[str, Any]:
        model = copy.deepcopy(base).to(self.device)
        named = list(model.named_parameters())
        result: dict[str, Any] = {}
        if variant is None:
            opt, byte_model = build_optimizer(name, named)
        else:
            opt, lopt, result = self.learned_face(name, variant, model, check_offset=5)
            byte_model = learned_byte_model(lopt)
        closure = step_needs(opt)[0]
        if closure:
            gen = self.generator(1)
            step = closure_step(opt, model, _random_batch(learner, self.config.batch_size, gen, self.device),
                            _random_batch(learner, self.config.batch_size, gen, self.device))
        else:
            gen = self.generator(2)  # the same gradients for every optimizer
            for _, p in named:
                p.grad = torch.randn(p.shape, generator=gen, device=self.device) * GRAD_SCALE
            step = opt.step
        stats = self.time(step)
        result.update(includes_closure=closure, time_s=stats,
                      stored_state_floats=_stored_state_floats(opt, [p for _, p in named]) / num_params)
        if closure:
            result["note"] = "whole opt.step(closure): forward/backward passes included, so no memory roofline"
        elif byte_model is not None:
            nbytes = byte_model.bytes_per_step(num_params)
            roofline = roofline_seconds(nbytes, bytes_per_s)
            result.update(byte_model=byte_model.as_dict(), bytes_per_step=nbytes, roofline_s=roofline,
                          ratio_to_roofline=stats["median_s"] / roofline)
        else:
            result["note"] = "no byte model declared for this optimizer"
        return result

    # -- 2. training iteration -------------------------------------------------------------------------------------

    def iteration_section(self) -> dict[str, Any]:
        learner = LEARNERS[self.config.iteration_model]
        base, source = learner.build()
        base = base.to(self.device)
        batch = _random_batch(learner, self.config.batch_size, self.generator(3), self.device)
        val_batch = _random_batch(learner, self.config.batch_size, self.generator(4), self.device)
        rows = []
        for row_name, name, variant in self.cases():
            self.log(f"iteration: {row_name} on {learner.name}")
            row = {"key": f"iteration:{row_name}:{learner.name}", "optimizer": row_name, "model": learner.name,
                   "kind": _kind(name)}
            if variant is not None:
                row.update(family=f"iteration:{name}:{learner.name}", variant=variant)
            rows.append(_guard(row, self.device, self._iteration_case, name, variant, base, batch, val_batch))
        medians = {r["optimizer"]: r["time_s"]["median_s"] for r in rows if "time_s" in r}
        for row in rows:
            if row["optimizer"] not in medians:
                continue
            if ADAM_REFERENCE in medians:
                row["ratio_to_adam"] = medians[row["optimizer"]] / medians[ADAM_REFERENCE]
            base_name = BASE_OPTIMIZER.get(row["optimizer"])
            if base_name in medians:
                row["base"] = base_name
                row["ratio_to_base"] = medians[row["optimizer"]] / medians[base_name]
        del base
        _release(self.device)
        return {"model": learner.name, "source": source, "batch_size": self.config.batch_size,
                "input_shape": list(learner.input_shape), "adam_reference": ADAM_REFERENCE, "rows": rows}

    def _iteration_case(self, name: str, variant: str | None, base: nn.Module,
                        batch: tuple[torch.Tensor, torch.Tensor],
                        val_batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        model = copy.deepcopy(base)  # every optimizer starts from the same weights
        result: dict[str, Any] = {}
        if variant is None:
            opt, _ = build_optimizer(name, list(model.named_parameters()))
        else:
            opt, _, result = self.learned_face(name, variant, model, check_offset=6)
        closure = step_needs(opt)[0]
        if closure:
            step = closure_step(opt, model, batch, val_batch)
        else:
            def step() -> None:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(batch[0]), batch[1]).backward()
                opt.step()
        return {**result, "includes_closure": closure, "time_s": self.time(step)}

    # -- 3. meta-training ------------------------------------------------------------------------------------------

    def meta_section(self) -> dict[str, Any]:
        # A meta-step moves far more than L2 holds, and the peak must not count the benchmark's own flush buffer.
        self.drop_flush_buffer()
        peak = PeakMemory(self.device)
        rows = []
        overrides = dict(seed=self.config.seed, **self.config.meta_overrides)
        cases = [(f"meta:K={k}", "hyperadam-paper", dict(meta_batch=k)) for k in self.config.meta_batches(self.device)]
        if self.device.type == "cpu" or self.config.quick:
            cases += [("meta:K=2[reference]", "hyperadam-paper", dict(meta_batch=2, fused=False)),
                      ("meta:dm-paper:K=2", "dm-paper", dict(meta_batch=2)),
                      ("meta:dm-paper:K=2[reference]", "dm-paper", dict(meta_batch=2, fused=False, compile=False)),
                      ("meta:rnnprop-paper:K=2", "rnnprop-paper", dict(meta_batch=2)),
                      ("meta:rnnprop-paper:K=2[reference]", "rnnprop-paper",
                       dict(meta_batch=2, fused=False, compile=False))]
        for key, name, options in cases:
            self.log(f"meta: {name}, {options}")
            config = preset(name, **{**overrides, **options})
            row = {"key": key, "preset": name, "meta_batch": config.meta_batch, "truncation": config.truncation,
                   "fused": config.fused, "compile": config.compile}
            rows.append(_guard(row, self.device, self._meta_case, config, peak))
        self.log("meta: memory across truncations")
        k, n = self.config.memory_meta_batch, self.config.memory_truncations
        config = preset("hyperadam-paper", meta_batch=k, seed=self.config.seed, **self.config.meta_overrides)
        row = {"key": f"meta-truncations:K={k}", "meta_batch": k, "truncations": n}
        rows.append(_guard(row, self.device, self._truncations_case, config, n, peak))
        return {"preset": "hyperadam-paper", "overrides": self.config.meta_overrides, "memory_method": peak.method,
                "rows": rows}

    def _meta_case(self, config: MetaConfig, peak: PeakMemory) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="metaopt-bench-") as run_dir:
            peak.current_bytes()  # release what earlier cases freed
            trainer = MetaTrainer(config, run_dir, device=self.device)
            task_bytes = peak.current_bytes()  # the process with the task loaded, before any meta-step
            for _ in range(max(self.warmup, 1)):  # the first meta-step compiles the fused cell where it is compiled
                trainer.meta_step_once()
            peak.reset()
            stats = self.time(trainer.meta_step_once, warmup=0, flush_cache=False)
            peak_bytes = peak.peak_bytes()
            del trainer
        inner_steps = config.meta_batch * config.truncation
        out = {"time_s": stats, "inner_steps_per_s": inner_steps / stats["median_s"], "peak_memory_bytes": peak_bytes}
        if task_bytes is not None:
            out.update(task_memory_bytes=task_bytes, peak_over_task_bytes=peak_bytes - task_bytes)
        return out

    def _truncations_case(self, config: MetaConfig, n: int, peak: PeakMemory) -> dict[str, Any]:
        peaks = []
        with tempfile.TemporaryDirectory(prefix="metaopt-bench-") as run_dir:
            trainer = MetaTrainer(config, run_dir, device=self.device)
            for _ in range(n):
                peak.reset()
                trainer.meta_step_once()
                peaks.append(peak.peak_bytes())
            del trainer
        return {"peak_memory_bytes": peaks, "first_peak_bytes": peaks[0], "last_peak_bytes": peaks[-1],
                "last_over_first": peaks[-1] / peaks[0]}

    # -- 4. Table 1 ------------------------------------------------------------------------------------------------

    def table1_section(self) -> dict[str, Any]:
        self.drop_flush_buffer()
        suite = SUITES["hyperadam-table1"]
        # The suite's optimizers with their rates (no learning-rate tuning: evaluate_suite runs the given rates) and
        # HyperAdam; the learned labels get fresh instances through ``sources`` (no checkpoints are committed).
        optimizers = {**suite.optimizers, "hyperadam": suite.optimizers.get("hyperadam", {})}
        sources = {label: FRESH_LEARNED[label]() for label in optimizers if label in FRESH_LEARNED}
        seeds, steps = self.config.num_table1_seeds, self.config.table1_steps
        device = str(self.device)
        # The command line's default (python -m metaopt.evaluate): learned optimizers compiled on a CPU, except in a
        # quick run, where compiling them would take longer than the rest of it.
        compiled = self.device.type == "cpu" and not self.config.quick

        def run(seed_list: range, num_steps: int | None) -> list[Any]:
            runs = evaluate_suite(suite, optimizers, seed_list, num_steps, device=device, progress=False,
                                  sources=sources, batched=self.device.type == "cuda", compile_learned=compiled)
            synchronize(self.device)
            return runs

        self.log(f"table1: {seeds} seeds")
        run(range(1), 1)  # warm-up: loads the datasets onto the device, initializes the kernels
        runs: list[Any] = []
        samples = []
        for _ in range(self.config.table1_repeats):
            begin = time.perf_counter()
            runs = run(range(seeds), steps)
            samples.append(time.perf_counter() - begin)
        per_update = {}
        for label in optimizers:
            own = [r.seconds_per_step for r in runs if r.optimizer == label]
            if own:
                per_update[label] = sum(own) / len(own)
        row = {"key": f"table1:{seeds}-seeds", "seeds": seeds, "steps": steps or suite.steps,
               "tasks": [getattr(t, "label", t) for t in suite.tasks], "optimizers": list(optimizers),
               "batched": self.device.type == "cuda", "compile_learned": compiled,
               "time_s": summarize(samples), "seconds_per_update": per_update}
        return {"suite": suite.name, "learned_sources": sorted(sources), "rows": [row]}

