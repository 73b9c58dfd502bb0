"""Meta-training: unroll maths (full BPTT, finite differences, closed form), batching, resume, CLI, distributed."""

import dataclasses
import gc
import math
import json
import os
import signal
import subprocess
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn

import meta_tasks
from meta_tasks.tasks import QuadraticTask
from metaopt.learned import HyperAdam
from metaopt.learned.base import CoordinatewiseOptimizer
from metaopt.meta import MetaConfig, MetaTrainer, Slot, TrainingStateError, TruncatedBPTT, unroll
from metaopt.meta import cli

ROOT = Path(__file__).resolve().parents[1]


class LRState(NamedTuple):
    unused: torch.Tensor


class LearnedLR(CoordinatewiseOptimizer):
    """SGD whose learning rate exp(log_lr) is the only meta-parameter: the simplest learned optimizer."""

    def __init__(self, lr0: float = 0.1):
        super().__init__()
        self.lr = 1.0
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr0), dtype=torch.float64))
        self._store_config(lr0=lr0)

    def init_flat(self, n, like):
        return LRState(like.new_zeros(n, 1))

    def step_flat(self, grad, state):
        return torch.exp(self.log_lr) * grad, state


def diag_quadratic(a=(2.0, 0.5), w0=(1.0, -1.5)):
    """f(w) = ½ Σ a_i w_i² as a QuadraticTask: W = diag(√a)/√2·√2... i.e. ‖Ww − 0‖² with W = diag(√(a/2))."""
    W = torch.diag(torch.sqrt(torch.tensor(a, dtype=torch.float64) / 2))
    task = QuadraticTask(W, torch.zeros(len(a), dtype=torch.float64))
    return task, {"theta": torch.tensor(w0, dtype=torch.float64)}


def make_slot(task, params, lopt, seed=0):
    return Slot(seed, task, dict(params), lopt.init(params), 0, torch.Generator().manual_seed(seed))


def meta_grad(lopt, slots, steps, **kw):
    out = unroll(lopt, slots, steps, lr=1.0, **kw)
    (g,) = torch.autograd.grad(out.meta_losses.sum(), [lopt.log_lr])
    return out, g


# ---------------------------------------------------------------------------------------------------------------------
# Unroll maths


def test_learnable_lr_meta_gradient_matches_closed_form_and_finite_differences():
    a, w0, T, eta = torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, -1.5], dtype=torch.float64), 6, 0.1
    task, params = diag_quadratic()
    lopt = LearnedLR(eta)
    out, g = meta_grad(lopt, [make_slot(task, params, lopt)], T, second_order=True)
    # closed form: w_t = (1 - η a)^t w0, f(w_t) = ½ Σ a w0² (1 − η a)^{2t}; meta-loss = mean_t f(w_t), θ = log η
    t = torch.arange(1, T + 1, dtype=torch.float64).unsqueeze(1)
    loss = (0.5 * a * w0**2 * (1 - eta * a) ** (2 * t)).sum(1).mean()
    dloss_deta = (0.5 * a * w0**2 * 2 * t * (1 - eta * a) ** (2 * t - 1) * (-a)).sum(1).mean()
    assert float(out.meta_losses[0].detach()) == pytest.approx(float(loss), rel=1e-12)
    assert float(g) == pytest.approx(float(dloss_deta * eta), rel=1e-10)  # chain rule through η = exp(θ)

    def loss_at(log_lr):
        with torch.no_grad():
            lopt.log_lr.fill_(log_lr)
        value = float(unroll(lopt, [make_slot(task, params, lopt)], T, lr=1.0).meta_losses[0].detach())
        return value

    theta0, h = math.log(eta), 1e-6
    fd = (loss_at(theta0 + h) - loss_at(theta0 - h)) / (2 * h)
    assert float(g) == pytest.approx(fd, rel=1e-6)


def test_first_order_meta_gradient_treats_inner_gradients_as_constants():
    a, w0, T, eta = torch.tensor([2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, -1.5], dtype=torch.float64), 5, 0.1
    task, params = diag_quadratic()
    lopt = LearnedLR(eta)
    _, g = meta_grad(lopt, [make_slot(task, params, lopt)], T, second_order=False)
    # first order: dw_t/dη = −Σ_{s<t} g_s with g_s = a w_s held constant
    ws = [w0 * (1 - eta * a) ** s for s in range(T + 1)]
    total = 0.0
    for t in range(1, T + 1):
        dw = -sum(a * ws[s] for s in range(t))
        total = total + (a * ws[t] * dw).sum()
    assert float(g) == pytest.approx(float(total / T * eta), rel=1e-10)


def test_one_truncation_equals_full_bptt_written_independently():
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            lopt = HyperAdam(num_candidates=3)
        finally:
            torch.set_default_dtype(torch.float32)
    task = QuadraticTask.sample(torch.Generator().manual_seed(2), dim=5)
    task = QuadraticTask(task.W.double(), task.y.double())
    params = {"theta": torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))}
    T = 8
    out = unroll(lopt, [make_slot(task, params, lopt)], T, lr=0.05, second_order=True)
    ours = torch.autograd.grad(out.meta_losses.sum(), list(lopt.parameters()))

    # full BPTT by hand: no vmap, no slots, plain autograd
    w, state, losses = params["theta"].clone().requires_grad_(), lopt.init(params), []
    for _ in range(T):
        loss = task.loss({"theta": w}, None)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        updates, state = lopt.update({"theta": g}, state, {"theta": w}, lr=0.05)
        w = w + updates["theta"]
        losses.append(task.loss({"theta": w}, None))
    reference = torch.autograd.grad(torch.stack(losses).mean(), list(lopt.parameters()))
    for x, y in zip(ours, reference):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-14)


def test_vectorized_unroll_equals_a_python_loop_over_instances():
    lopt = HyperAdam(num_candidates=3)
    base = meta_tasks.tasks.QuadraticTask.sample(torch.Generator().manual_seed(0), dim=6)
    from meta_tasks.tricks import hyperadam_tricks

    def slots():
        out = []
        for i in range(3):
            gen = torch.Generator().manual_seed(10 + i)
            inst = hyperadam_tricks(base, gen, convex_k=4)
            out.append(Slot(i, inst, inst.init(gen), lopt.init(inst.init(torch.Generator().manual_seed(i))), 0,
                            torch.Generator().manual_seed(i)))
        return out

    vec = unroll(lopt, slots(), 5, lr=0.01)
    loop = unroll(lopt, slots(), 5, lr=0.01, vectorized=False)
    assert torch.allclose(vec.meta_losses, loop.meta_losses, rtol=1e-5)
    g_vec = torch.autograd.grad(vec.meta_losses.sum(), list(lopt.parameters()))
    g_loop = torch.autograd.grad(loop.meta_losses.sum(), list(lopt.parameters()))
    for x, y in zip(g_vec, g_loop):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-7)


def test_the_vmapped_loop_with_and_without_a_graph_takes_the_same_steps():
    """meta-training's unroll and the evaluation's batched seeds are one loop (metaopt.meta.inner.VmappedLoop): run
    with the graph (differentiable=True, as the unroll) and without (as train_batched), it visits the same weights
    and losses, and the meta-gradient flows only where the graph is kept."""
    from torch.func import vmap

    from meta_tasks.base import Batch
    from metaopt.meta.inner import VmappedLoop
    from metaopt.tree import stack

    lopt = HyperAdam(num_candidates=3)
    task = meta_tasks.tasks.QuadraticTask.sample(torch.Generator().manual_seed(0), dim=5)
    inits = [task.init(torch.Generator().manual_seed(i)) for i in range(3)]
    loss_fn = vmap(lambda p, b: task.loss(p, b), in_dims=(0, Batch(0, 0, None)))

    def run(differentiable):
        gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]

        def sample(split):
            batches = [task.sample_batch(g, split) for g in gens]
            return Batch(torch.stack([b.x for b in batches]), torch.stack([b.y for b in batches]))

        seen = []
        loop = VmappedLoop(lopt, loss_fn, sample, lr=0.01, differentiable=differentiable, fused=False)
        params = {n: p.clone().requires_grad_() for n, p in stack(inits).items()}
        params, state, losses, seconds = loop.run(params, stack([lopt.init(p) for p in inits]), 6,
                                                  lambda i, p, loss: seen.append(loss))
        return params, losses, seen, seconds

    graph_params, graph_losses, graph_seen, _ = run(True)
    plain_params, plain_losses, plain_seen, seconds = run(False)
    assert len(graph_losses) == len(plain_losses) == 6 and seconds > 0
    for a, b in zip(graph_losses + graph_seen, plain_losses + plain_seen):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    for n in graph_params:
        assert torch.allclose(graph_params[n], plain_params[n], rtol=1e-6, atol=1e-7)
    assert all(p.grad_fn is None for p in plain_params.values())
    meta = torch.autograd.grad(torch.stack(graph_seen).mean(), list(lopt.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in meta)


@pytest.mark.parametrize("second_order", [False, True])
def test_recompute_gives_the_same_meta_gradient(second_order):
    """Activation checkpointing of the update (recompute=True) changes memory, not the maths: same losses, same
    meta-gradient, for vmapped instances under the tricks, first and second order."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        lopt = HyperAdam(num_candidates=3)
    finally:
        torch.set_default_dtype(torch.float32)
    base = QuadraticTask.sample(torch.Generator().manual_seed(0), dim=6)
    base = QuadraticTask(base.W.double(), base.y.double())

    def run(recompute):
        slots = []
        for i in range(3):
            gen = torch.Generator().manual_seed(10 + i)
            params = {"theta": torch.randn(6, dtype=torch.float64, generator=gen)}
            slots.append(Slot(i, base, params, lopt.init(params), 0, torch.Generator().manual_seed(i)))
        out = unroll(lopt, slots, 5, lr=0.05, second_order=second_order, recompute=recompute)
        return out.meta_losses, torch.autograd.grad(out.meta_losses.sum(), list(lopt.parameters()))

    losses, grads = run(False)
    losses_rc, grads_rc = run(True)
    assert torch.equal(losses, losses_rc)
    for x, y in zip(grads, grads_rc):
        assert torch.allclose(x, y, rtol=1e-12, atol=1e-15)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_recompute_reaches_the_unroll_from_the_config(tmp_path, monkeypatch):
    seen = []
    real = unroll

    def spy(*args, **kw):
        seen.append(kw.get("recompute"))
        return real(*args, **kw)

    MetaTrainer(tiny_config(meta_steps=1, val_every=0, recompute=True), tmp_path,
                estimator=TruncatedBPTT(spy)).meta_step_once()
    assert seen and all(seen)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer


def tiny_config(**kw):
    base = dict(optimizer="hyperadam", optimizer_kwargs='{"num_candidates": 2}', family="quadratic", horizon=4,
                truncation=2, meta_batch=2, meta_steps=6, outer_lr=1e-2, val_every=3, val_tasks=2,
                checkpoint_every=2, rs_learner=1.0, rs_convex=1.0, convex_k=3, lr=0.05, batch_size=4)
    return MetaConfig(**{**base, **kw})


def theta(trainer):
    return {k: v.clone() for k, v in trainer.lopt.state_dict().items()}


def test_resume_is_bit_identical(tmp_path):
    straight = MetaTrainer(tiny_config(meta_steps=8), tmp_path / "a")
    straight.run(progress=False)
    half = MetaTrainer(tiny_config(meta_steps=4), tmp_path / "b")
    half.run(progress=False)
    resumed = MetaTrainer(tiny_config(meta_steps=8), tmp_path / "b", resume=True)
    assert resumed.meta_step == 4
    resumed.run(progress=False)
    for k, v in theta(straight).items():
        assert torch.equal(v, theta(resumed)[k]), k
    assert resumed.best_score == straight.best_score


def test_no_gradient_crosses_a_truncation_boundary(tmp_path):
    trainer = MetaTrainer(tiny_config(), tmp_path)
    trainer.meta_step_once()
    for slot in trainer.slots:
        assert all(p.grad_fn is None and not p.requires_grad for p in slot.params.values())
        assert all(t.grad_fn is None for f in slot.opt_state for t in f.values())
    trainer.meta_step_once()  # backward would raise if it reached the first truncation's freed graph


def test_instances_reset_at_the_horizon_with_staggered_offsets(tmp_path):
    trainer = MetaTrainer(tiny_config(meta_batch=4), tmp_path)
    assert [s.step for s in trainer.slots] == [0, 2, 0, 2]
    seeds = [s.instance_seed for s in trainer.slots]
    trainer.meta_step_once()
    assert [s.step for s in trainer.slots] == [2, 4, 2, 4]
    trainer.meta_step_once()
    assert [s.generation for s in trainer.slots] == [0, 1, 0, 1]
    assert trainer.slots[1].instance_seed != seeds[1] and trainer.slots[0].instance_seed == seeds[0]
    fresh = MetaTrainer(tiny_config(meta_batch=4), tmp_path).slots[1]
    assert not torch.equal(trainer.slots[1].task.base().W, fresh.task.base().W)  # a new configuration was drawn


def test_memory_stays_flat_over_200_truncations(tmp_path):
    trainer = MetaTrainer(tiny_config(meta_steps=10**6, val_every=0), tmp_path)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    for _ in range(20):
        trainer.meta_step_once()
    before = live_tensors()
    for _ in range(200):
        trainer.meta_step_once()
    assert live_tensors() <= before + 5


@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_meta_gradient_is_skipped_and_theta_untouched(tmp_path, monkeypatch, fused):
    trainer = MetaTrainer(tiny_config(fused=fused), tmp_path)
    trainer.meta_step_once()
    before, adam_before = theta(trainer), {k: v.clone() for k, v in trainer.outer.state_dict()["state"][0].items()}
    method = "fused_step" if fused else "step_flat"
    original = getattr(trainer.lopt, method)

    def poisoned(grad, state, *args, **kwargs):
        d, s = original(grad, state, *args, **kwargs)
        return d * float("nan"), s

    monkeypatch.setattr(trainer.lopt, method, poisoned)
    metrics = trainer.meta_step_once()
    assert metrics["skipped"] == 1
    assert all(torch.equal(v, theta(trainer)[k]) for k, v in before.items())
    assert all(torch.equal(v, trainer.outer.state_dict()["state"][0][k]) for k, v in adam_before.items())
    assert all(torch.isfinite(p).all() for s in trainer.slots for p in s.params.values())  # diverged slots reset


def test_corrupt_state_is_an_error_naming_the_file(tmp_path):
    MetaTrainer(tiny_config(meta_steps=2), tmp_path).run(progress=False)
    state = tmp_path / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(TrainingStateError, match="state.pt: corrupt"):
        MetaTrainer(tiny_config(), tmp_path, resume=True)
    with pytest.raises(TrainingStateError, match="no training state"):
        MetaTrainer(tiny_config(), tmp_path / "empty", resume=True)


def test_resume_with_other_flags_is_refused(tmp_path):
    MetaTrainer(tiny_config(meta_steps=2), tmp_path).run(progress=False)
    with pytest.raises(TrainingStateError, match="outer_lr"):
        MetaTrainer(tiny_config(outer_lr=0.5), tmp_path, resume=True)


def test_sigint_saves_the_state_and_stops(tmp_path):
    def interrupt(metrics):
        if metrics["meta_step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    trainer = MetaTrainer(tiny_config(meta_steps=50, checkpoint_every=100), tmp_path, logger=interrupt)
    with pytest.raises(KeyboardInterrupt, match="resume with --resume"):
        trainer.run(progress=False)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["meta_step"] == 3
    assert MetaTrainer(tiny_config(meta_steps=50), tmp_path, resume=True).meta_step == 3


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="truncation"):
        MetaConfig(horizon=100, truncation=30)
    with pytest.raises(ValueError, match="meta_loss"):
        MetaConfig(meta_loss="median")
    with pytest.raises(ValueError, match="outer_lr"):
        MetaConfig(outer_lr=0)
    with pytest.raises(ValueError, match="optimizer_kwargs"):
        MetaConfig(optimizer_kwargs="{not json")
    with pytest.raises(ValueError, match="val_score"):
        MetaConfig(val_score="median")


def test_log_mean_validation_is_the_mean_log_of_the_same_final_losses(tmp_path, monkeypatch):
    """val_score="log-mean" scores the same validation runs by the mean of their logs (the general family mixes loss
    scales); a diverged instance still scores +inf."""
    import metaopt.meta.inner

    finals = iter([0.5, 2.0, 0.5, 2.0, 0.5, float("nan")])

    def fake_train(*args, **kwargs):
        return metaopt.meta.inner.Run("validation", "t", 0, [9.0, next(finals)], 0.0, {})

    monkeypatch.setattr(metaopt.meta.inner, "train", fake_train)
    plain = MetaTrainer(tiny_config(), tmp_path / "plain").validate()
    logged = MetaTrainer(tiny_config(val_score="log-mean"), tmp_path / "log").validate()
    assert plain == pytest.approx(1.25) and logged == pytest.approx((math.log(0.5) + math.log(2.0)) / 2)
    assert MetaTrainer(tiny_config(val_score="log-mean"), tmp_path / "nan").validate() == math.inf


def test_theta_before_training_is_validated_and_is_a_best_candidate(tmp_path):
    cfg = tiny_config(meta_steps=3, val_every=3)
    fresh = MetaTrainer(cfg, tmp_path / "fresh").validate()
    trainer = MetaTrainer(cfg, tmp_path / "run")
    trainer.run(progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines[0]["initial_val_score"] == fresh
    assert lines[-1]["best_val_score"] == min(fresh, lines[-1]["val_score"])
    assert all("initial_val_score" not in line for line in lines[1:])
    if lines[-1]["val_score"] >= fresh:  # training did not beat θ0 on validation: best/ holds θ0
        from metaopt.learned.base import from_pretrained
        best = from_pretrained(tmp_path / "run" / "best")
        init = MetaTrainer(cfg, tmp_path / "again").lopt
        assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), init.state_dict().values()))


def test_meta_training_lowers_the_meta_loss_on_quadratics(tmp_path):
    """Learning to optimize works end to end: the mean meta-loss of the last steps is below the first steps'."""
    cfg = tiny_config(meta_steps=120, meta_batch=4, horizon=10, truncation=5, val_every=0, outer_lr=3e-2,
                      rs_learner=0.0, convex_k=0, lr=0.02)
    trainer = MetaTrainer(cfg, tmp_path)
    trainer.run(progress=False)
    losses = [json.loads(line)["meta_loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20


# ---------------------------------------------------------------------------------------------------------------------
# The command line


TINY_FLAGS = ["--family", "quadratic", "--optimizer-kwargs", '{"num_candidates": 2}', "--horizon", "4",
              "--truncation", "2", "--meta-batch", "2", "--val-every", "2", "--val-tasks", "1", "--batch-size", "4",
              "--device", "cpu"]


def test_cli_end_to_end_with_export_resume_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir, out = tmp_path / "run", tmp_path / "export"
    assert cli.main([*TINY_FLAGS, "--meta-steps", "2", "--run-dir", str(run_dir), "--out", str(out),
                     "--wandb", "offline"]) == 0
    assert {"config.json", "state.pt", "log.jsonl", "best", "last", "summary.json"} <= {p.name for p in run_dir.iterdir()}
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs and any(p.suffix == ".wandb" for p in offline_runs[0].iterdir())
    import metaopt

    opt = metaopt.make_optimizer(str(out), [torch.zeros(3, requires_grad=True)])
    assert opt.param_groups[0]["lr"] == 0.005
    assert cli.main([*TINY_FLAGS, "--meta-steps", "4", "--run-dir", str(run_dir), "--resume"]) == 0
    assert torch.load(run_dir / "state.pt", weights_only=True)["meta_step"] == 4
    assert cli.main([*TINY_FLAGS, "--meta-steps", "4", "--run-dir", str(run_dir), "--out", str(out),
                     "--resume", "--export", "best"]) == 0


def test_cli_help_documents_every_flag():
    text = subprocess.run([sys.executable, str(ROOT / "train_meta.py"), "--help"], capture_output=True, text=True,
                          check=True).stdout
    for field in MetaConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in text


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """Two gloo ranks with 2 instances each see the instances of one process with 4, and average their meta-gradients:
    theta agrees to float rounding (the all-reduce sums in another order)."""
    common = [*TINY_FLAGS, "--meta-batch", "4", "--meta-steps", "3", "--val-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(ROOT / "train_meta.py"), *common, "--run-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", str(ROOT / "train_meta.py"), *common,
                             "--run-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_meta_training_runs_on_cuda(tmp_path):
    trainer = MetaTrainer(tiny_config(meta_steps=4), tmp_path, device="cuda")
    metrics = trainer.run(progress=False)
    assert metrics["meta_step"] == 4 and math.isfinite(metrics["meta_loss"])
    assert all(p.device.type == "cuda" for p in trainer.lopt.parameters())
    assert MetaTrainer(tiny_config(meta_steps=6), tmp_path, device="cuda", resume=True).meta_step == 4


# ---------------------------------------------------------------------------------------------------------------------
# Campaigns and the outer schedule


CAMPAIGN_ARGS = ["--preset", "hyperadam-paper", "--optimizer-kwargs", '{"num_candidates": 2}', "--family", "quadratic",
                 "--horizon", "4", "--truncation", "2", "--meta-batch", "2", "--val-every", "2", "--val-tasks", "2",
                 "--lr", "0.05", "--batch-size", "4", "--convex-k", "3", "--no-compile", "--outer-lr", "1e-2"]


def test_campaign_continues_on_a_fresh_machine(tmp_path, monkeypatch):
    from metaopt.meta import campaign
    from metaopt.meta.cli import main

    monkeypatch.chdir(tmp_path)
    camp = tmp_path / "campaign"
    assert main([*CAMPAIGN_ARGS, "--meta-steps", "4", "--run-dir", "a", "--campaign", str(camp)]) == 0
    state = torch.load(camp / "campaign.pt", weights_only=True)
    assert (camp / "campaign.pt").stat().st_size < 5e6 and state["meta_step"] == 4
    assert (camp / "best" / "model.safetensors").is_file() and (camp / "README.md").is_file()
    # a fresh machine: no run directory; the campaign continues from campaign.pt with restarted instances
    trainer = MetaTrainer(preset_config(CAMPAIGN_ARGS, meta_steps=8), tmp_path / "b")
    trainer.load_campaign(camp / "campaign.pt")
    assert trainer.meta_step == 4 and trainer.best_score == state["best_score"]
    assert all(torch.equal(v, state["theta"][k]) for k, v in trainer.lopt.state_dict().items())
    assert [s.generation for s in trainer.slots] == [g + 1 for g in state["generations"]]
    assert all(s.step == trainer._offset(i) for i, s in enumerate(trainer.slots))
    assert main([*CAMPAIGN_ARGS, "--meta-steps", "8", "--run-dir", "b", "--campaign", str(camp), "--export", "best",
                 "--out", "export"]) == 0
    records = campaign.pieces(camp)
    assert [(r["meta_step_from"], r["meta_step_to"]) for r in records] == [(0, 4), (4, 8)]
    assert campaign.totals(camp)["inner_steps"] == 8 * 2 * 2
    assert [m["meta_step"] for m in campaign.log(camp) if "val_score" in m] == [2, 4, 6, 8]
    assert (tmp_path / "export" / "model.safetensors").is_file()
    with pytest.raises(TrainingStateError, match="different configuration"):
        MetaTrainer(preset_config(CAMPAIGN_ARGS, meta_steps=8, lr=0.1), tmp_path / "c").load_campaign(
            camp / "campaign.pt")


def test_a_campaign_saved_before_a_config_field_existed_continues_as_that_fields_default(tmp_path):
    """A state written before a field was added (here ``val_score``) compares as the field's default; a value it
    did save still has to match."""
    trainer = MetaTrainer(preset_config(CAMPAIGN_ARGS, meta_steps=2), tmp_path / "a")
    trainer.save_campaign(tmp_path / "campaign.pt")
    state = torch.load(tmp_path / "campaign.pt", weights_only=True)
    del state["config"]["val_score"]
    torch.save(state, tmp_path / "old.pt")
    MetaTrainer(preset_config(CAMPAIGN_ARGS, meta_steps=4), tmp_path / "b").load_campaign(tmp_path / "old.pt")
    assert trainer.config.changes_from(state["config"]) == []
    assert trainer.config.changes_from({**state["config"], "val_score": "log-mean"}) == ["val_score"]
    with pytest.raises(TrainingStateError, match=r"differs in \['meta_steps', 'val_score'\]"):
        MetaTrainer(preset_config(CAMPAIGN_ARGS, meta_steps=4, val_score="log-mean"), tmp_path / "c").load_campaign(
            tmp_path / "old.pt")


def preset_config(args, **overrides):
    from metaopt.meta.cli import build_parser
    from metaopt.meta.config import preset

    parsed = build_parser().parse_args(args)
    fields = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(MetaConfig)
              if getattr(parsed, f.name) is not None}
    return preset(parsed.preset, **{**fields, **overrides})


def test_export_of_last_refuses_weights_worse_than_the_initialization(tmp_path, monkeypatch):
    from metaopt.meta.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(MetaTrainer, "validate", lambda self: 1.0 if self.meta_step == 0 else 2.0)
    with pytest.raises(SystemExit, match="worse than its initialization"):
        main([*CAMPAIGN_ARGS, "--meta-steps", "2", "--run-dir", "r", "--export", "last", "--out", "export"])
    assert not (tmp_path / "export").exists()


def test_outer_learning_rate_follows_its_cosine_schedule(tmp_path):
    config = tiny_config(meta_steps=4, outer_lr=1e-2, outer_lr_final=1e-3, val_every=0)
    assert config.outer_lr_at(0) == pytest.approx(1e-2) and config.outer_lr_at(4) == pytest.approx(1e-3)
    assert config.outer_lr_at(2) == pytest.approx(5.5e-3) and config.outer_lr_at(10) == pytest.approx(1e-3)
    assert tiny_config().outer_lr_at(3) == tiny_config().outer_lr
    trainer = MetaTrainer(config, tmp_path)
    seen = [trainer.meta_step_once()["outer_lr"] for _ in range(4)]
    assert seen == [pytest.approx(config.outer_lr_at(i)) for i in range(4)]
    assert trainer.outer.param_groups[0]["lr"] == pytest.approx(config.outer_lr_at(3))
    with pytest.raises(ValueError, match="outer_lr_final"):
        tiny_config(outer_lr_final=1.0)


def test_main_job_report_states_every_rate_its_tuning_p_values_verdicts_and_files(tmp_path):
    """Issue 18: the main job's printed table names every row's learning rate and how it was set (tuned on which
    seeds, or fixed), tests every row against this run, gives a verdict per task in words, writes the curves PNG and
    says where the run, export and results are and which command runs the full suite."""
    torch.manual_seed(0)
    export = HyperAdam(num_candidates=2).save_pretrained(tmp_path / "run" / "last")
    out = tmp_path / "run" / "eval"
    text = cli.evaluate_export(export, out, seeds=2, tune_seeds=1, adam_grid=(1e-3, 1e-2), tasks=["mlp-sigmoid"],
                               steps=4, progress=False)
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| mlp-sigmoid |")}
    assert set(rows) == {cli.MAIN_JOB_THIS, cli.MAIN_JOB_SHIPPED, cli.MAIN_JOB_ADAM, *cli.MAIN_JOB_BASELINES}
    assert "reference" in rows[cli.MAIN_JOB_THIS]
    assert f"| final train loss | {cli.BATCHES_HEADER} | p vs this run |" in text  # the papers' measure beside it
    for label in (cli.MAIN_JOB_THIS, cli.MAIN_JOB_SHIPPED):
        assert "α = 0.005, its checkpoint's" in rows[label]
    tuned = json.loads((out / "results.json").read_text())["tuned"]["mlp-sigmoid"][cli.MAIN_JOB_ADAM]
    assert f"{tuned['lr']:.3g}, tuned on seeds 10000 over " in rows[cli.MAIN_JOB_ADAM]
    for label, hparams in cli.MAIN_JOB_BASELINES.items():
        assert f"| {hparams['lr']:g}, fixed, not tuned (hypergrad_lr = {hparams['hypergrad_lr']:g}) |" in rows[label]
    for label, row in rows.items():
        if label != cli.MAIN_JOB_THIS:
            assert math.isfinite(float(row.rstrip(" |").rsplit("| ", 1)[1]))  # the p-value against this run
    verdict = next(line for line in text.splitlines() if line.startswith("- mlp-sigmoid: this run "))
    assert "tuned Adam" in verdict and "the shipped HyperAdam" in verdict
    assert f"curves: {out / 'curves.png'}" in text and (out / "curves.png").stat().st_size > 0
    assert f"export: {export}" in text and f"results: {out}" in text
    assert text.splitlines()[-1].startswith("the full Table-1 suite") and "--suite hyperadam-table1" in text
    assert "bit for bit" not in text  # a fresh HyperAdam is not the shipped checkpoint


def test_main_job_report_says_when_this_run_reproduced_the_shipped_weights(tmp_path):
    torch.manual_seed(0)
    first = HyperAdam(num_candidates=2).save_pretrained(tmp_path / "a")
    copy = Path(shutil.copytree(first, tmp_path / "b"))
    assert cli.same_weights(first, copy)
    torch.manual_seed(1)
    assert not cli.same_weights(first, HyperAdam(num_candidates=2).save_pretrained(tmp_path / "c"))
    torch.manual_seed(0)
    assert not cli.same_weights(first, HyperAdam(num_candidates=2, lr=0.01).save_pretrained(tmp_path / "d"))
    assert not cli.same_weights(first, HyperAdam(num_candidates=3).save_pretrained(tmp_path / "e"))
    text = cli.evaluate_export(first, tmp_path / "eval", seeds=2, tune_seeds=1, adam_grid=(1e-3,),
                               tasks=["mlp-sigmoid"], steps=2, shipped=copy, progress=False)
    assert f"this run's weights equal {copy}'s bit for bit" in text


def test_meta_training_progress_lines_say_the_time_left_and_quiet_silences_them(tmp_path, capsys):
    assert cli.main([*TINY_FLAGS, "--meta-steps", "4", "--log-every", "2", "--run-dir", str(tmp_path / "a")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("meta-step ")]
    assert lines[0].startswith("meta-step 2/4:") and lines[0].endswith(" left") and lines[-1].startswith("meta-step 4/4")
    assert cli.main([*TINY_FLAGS, "--meta-steps", "4", "--log-every", "2", "--run-dir", str(tmp_path / "b"),
                     "--quiet"]) == 0
    assert "meta-step" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# The ablation's variant checkpoints (python -m metaopt.meta.ablation)

ABLATION_EXTRA = ["--family", "quadratic", "--horizon", "4", "--truncation", "2", "--meta-batch", "2", "--val-every",
                  "2", "--val-tasks", "2", "--lr", "0.05", "--batch-size", "4", "--no-compile", "--outer-lr", "1e-2"]


def test_ablation_variants_get_one_budget_each_as_campaigns_and_are_exported_with_cards(tmp_path, monkeypatch):
    from metaopt import from_pretrained
    from metaopt.evaluate.suites import ABLATION_CHECKPOINTS
    from metaopt.meta import ablation, campaign

    monkeypatch.chdir(tmp_path)
    root, runs = tmp_path / "ablation", tmp_path / "runs"
    labels = ["hyperadam-J1", "hyperadam-no-lstm"]
    assert ablation.run(4, max_minutes=0, root=root, run_root=runs, labels=labels, extra=ABLATION_EXTRA) == \
        {label: "not started" for label in labels}  # no time: nothing is started
    states = ablation.run(4, root=root, run_root=runs, labels=labels, extra=ABLATION_EXTRA)
    assert states == {label: "exported" for label in labels}
    j1, no_lstm = from_pretrained(root / "hyperadam-J1"), from_pretrained(root / "hyperadam-no-lstm")
    assert j1.num_candidates == 1 and no_lstm.lstm is None and no_lstm.num_candidates == 20
    for label in labels:
        directory = root / label
        assert campaign.totals(directory / "campaign")["meta_steps"] == 4
        assert (directory / "model.safetensors").read_bytes() == \
            (directory / "campaign" / "best" / "model.safetensors").read_bytes()
        card = (directory / "README.md").read_text()
        assert f"# {label} — HyperAdam ablation variant" in card and "4 meta-steps, seed 0" in card
        assert (directory / "golden.json").is_file() and (directory / "validation.png").is_file()
    # finished variants are neither trained nor exported again
    monkeypatch.setattr(ablation.cli, "main", lambda argv: pytest.fail(f"trained again: {argv}"))
    monkeypatch.setattr(ablation, "export", lambda *a, **k: pytest.fail("exported again"))
    assert ablation.run(4, root=root, run_root=runs, labels=labels, extra=ABLATION_EXTRA) == states
    with pytest.raises(ValueError, match="unknown ablation variant"):
        ablation.run(4, root=root, labels=["hyperadam-J2"])
    assert set(ablation.VARIANTS) == set(ABLATION_CHECKPOINTS)  # one variant per label the suite evaluates


@pytest.mark.parametrize("name", ["hyperadam-paper", "hyperadam-cpu", "hyperadam-general", "dm-paper", "rnnprop-paper"])
def test_the_campaign_presets_validate_on_at_least_16_instances(name):
    """Issue 12: validation on >= 16 held-out instances (four gave a score too noisy to select theta by)."""
    from metaopt.meta.config import preset

    assert preset(name).val_tasks >= 16


def test_campaign_stopping_rule_counts_the_cpu_hours_since_the_best_validation(tmp_path):
    """Issue 12's rule: 10 CPU-hours, or stop once the validation score has not improved for 3. A piece's CPU time is
    shared evenly over its meta-steps; those after the best validation's meta-step count as flat."""
    from metaopt.meta import campaign

    records = [dict(meta_step_from=0, meta_step_to=100, cpu_seconds=3600.0, inner_steps=1, wall_seconds=1.0),
               dict(meta_step_from=100, meta_step_to=300, cpu_seconds=7200.0, inner_steps=1, wall_seconds=1.0)]
    (tmp_path / campaign.PIECES_FILE).write_text(json.dumps(records))
    scores = {50: 1.0, 150: 0.5, 250: 0.6}
    (tmp_path / campaign.LOG_FILE).write_text("".join(json.dumps({"meta_step": k, "val_score": v}) + "\n"
                                                      for k, v in scores.items()))
    rule = campaign.stopping_rule(tmp_path)
    assert rule["best_meta_step"] == 150 and rule["flat_cpu_hours"] == pytest.approx(1.5)
    assert rule["cpu_hours"] == pytest.approx(3.0) and rule["done"] is False
    records.append(dict(meta_step_from=300, meta_step_to=400, cpu_seconds=1.5 * 3600, inner_steps=1, wall_seconds=1.0))
    (tmp_path / campaign.PIECES_FILE).write_text(json.dumps(records))
    assert campaign.stopping_rule(tmp_path)["flat_cpu_hours"] == pytest.approx(3.0)
    assert campaign.stopping_rule(tmp_path)["done"] is True
    assert campaign.cpu_hours_since(tmp_path, 0) == pytest.approx(4.5)
