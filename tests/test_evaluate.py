"""The evaluation harness: identical starts and data for every optimizer, determinism, batched learned optimizers equal
to the per-seed loop, tuning on separate seeds, the statistics and files it writes, and every suite in reduced form."""

import csv
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import scipy.stats
import torch
from helpers import requires_compiler

import meta_tasks
from meta_tasks import datasets
from metaopt import evaluate
from metaopt.evaluate import experiment, report, suites
from metaopt.learned import DMOptimizer, HyperAdam, RNNprop

needs_fmnist = pytest.mark.skipif(datasets.find_dataset("fashion-mnist") is None,
                                  reason="real Fashion-MNIST not installed (bash .ci/setup)")


def test_every_optimizer_starts_from_the_same_weights_and_batch():
    task = meta_tasks.get_task("quadratic", dim=6, seed=1)
    a = evaluate.train(task, "adam", dict(lr=0.1), seed=3, steps=5)
    b = evaluate.train(task, "sgd", dict(lr=0.01), seed=3, steps=5)
    assert a.losses[0] == b.losses[0]           # the first loss is evaluated before any update
    assert a.losses[1:] != b.losses[1:]
    again = evaluate.train(task, "adam", dict(lr=0.1), seed=3, steps=5)
    assert again.losses == a.losses
    assert evaluate.train(task, "adam", dict(lr=0.1), seed=4, steps=5).losses[0] != a.losses[0]


def test_training_decreases_a_quadratic_and_table_reports_it():
    task = meta_tasks.get_task("quadratic", dim=6, seed=1)
    runs = [evaluate.train(task, "adam", dict(lr=0.05), seed=s, steps=200) for s in range(3)]
    assert all(r.losses[-1] < 0.1 * r.losses[0] for r in runs)
    table = evaluate.markdown_table(runs)
    mean = sum(r.losses[-1] for r in runs) / 3
    assert f"| quadratic | adam | {mean:.4f} ± " in table


@needs_fmnist
def test_cli_writes_results_and_table(tmp_path, capsys):
    assert evaluate.main(["--optimizers", "adam,sgd", "--seeds", "2", "--steps", "3", "--device", "cpu",
                          "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    progress = [line for line in captured.err.splitlines() if "final loss" in line]
    assert len(progress) == 4 * 2 and progress[0].rstrip().endswith(" left]") and progress[-1].endswith("[8/8]")
    assert captured.err.splitlines()[-1].startswith(f"wrote {tmp_path}: results.json, table.md, ")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["suite"] == "hyperadam-table1" and results["meta"]["device"] == "cpu"
    assert len(results["runs"]) == 4 * 2 * 2
    assert all(len(r["losses"]) == 3 and 0 <= r["test"]["top1"] <= 1 for r in results["runs"])
    assert (tmp_path / "table.md").read_text().strip() == printed.strip()


def test_cli_quiet_prints_only_the_table(tmp_path, capsys):
    assert evaluate.main(["--optimizers", "adam", "--tasks", "quadratic", "--seeds", "1", "--steps", "2", "--device",
                          "cpu", "--no-tune", "--out", str(tmp_path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("## hyperadam-table1")


def test_time_left_in_words():
    from metaopt.environment import time_left

    assert time_left(10.0, 0, 5) == "" and time_left(10.0, 5, 5) == "done"
    assert time_left(10.0, 1, 5) == "~40 s left" and time_left(30.0, 1, 5) == "~2 min left"
    assert time_left(3600.0, 1, 5) == "~4.0 h left"
    assert time_left(30.0, 1, 5, cap=20.0) == "~20 s left (to the time limit)"


def test_cli_rejects_unknown_optimizer():
    with pytest.raises(SystemExit, match="Valid names"):
        evaluate.main(["--optimizers", "adamw-typo", "--seeds", "1", "--steps", "1"])


@pytest.mark.parametrize("argv, batched, compiled", [
    (["--device", "cpu"], False, True), (["--device", "cuda"], True, False),
    (["--device", "cpu", "--batch"], True, True), (["--device", "cuda", "--no-batch"], False, False),
    (["--device", "cpu", "--no-compile-learned"], False, False),
    (["--device", "cuda", "--compile-learned"], True, True)])
def test_cli_batches_seeds_on_cuda_and_loops_on_cpu_unless_told(monkeypatch, argv, batched, compiled):
    """The vmapped all-seeds loop is the default on CUDA only: on a 2-core CPU, 30 seeds of hyperadam on mlp-sigmoid
    took 482 s batched and 136 s seed by seed (same results); --batch / --no-batch override the default. The learned
    optimizers' compiled face is the command line's default on a CPU (--compile-learned / --no-compile-learned)."""
    from metaopt.evaluate import experiment

    class Stop(Exception):
        pass

    seen = {}

    def fake_run_config(steps, splits, eval_every, record_lr, batched, progress, papers_measure=False,
                        compile_learned=False):
        seen["batched"], seen["papers_measure"], seen["compiled"] = batched, papers_measure, compile_learned
        raise Stop

    monkeypatch.setattr(experiment, "RunConfig", fake_run_config)
    monkeypatch.setattr(experiment, "build_tasks", lambda *args: [])  # no CUDA here: nothing is built
    with pytest.raises(Stop):
        evaluate.main([*argv, "--optimizers", "adam", "--tasks", "quadratic", "--no-tune", "--seeds", "1", "--quiet"])
    assert seen["batched"] is batched and seen["papers_measure"]  # hyperadam-table1 computes the papers' measure
    assert seen["compiled"] is compiled


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--suite", "--optimizers", "--seeds", "--steps", "--device", "--dataset", "--out", "--reference",
                 "--tune", "--quick", "--checkpoints", "--skip-missing", "--tasks", "--eval-size"):
        assert flag in text
    assert all(name in text for name in evaluate.SUITES)


# ----------------------------------------------------------------------------------------------------------------------
# All seeds of a learned optimizer at once == the per-seed loop through its torch.optim face


def _learned_rules():
    return pytest.importorskip("metaopt.learned.rules")


LEARNED_FACTORIES = {
    "hyperadam": lambda: HyperAdam(num_candidates=2),
    "dm": DMOptimizer,
    "rnnprop": RNNprop,
    "cam-hd-learned-gamma": lambda: _learned_rules().LearnedGammaCAMHD(),         # Adam base: static step counts
    "cam-hd-learned-gamma-sgd": lambda: _learned_rules().LearnedGammaCAMHD(base="sgd", hypergrad_lr=1e-5),
}


def _assert_same_runs(batched, looped):
    for b, loop in zip(batched, looped, strict=True):
        assert b.batched and not loop.batched and b.seed == loop.seed
        torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(loop.losses), rtol=1e-5, atol=1e-7)
        assert b.test.keys() == loop.test.keys()
        for key in b.test:
            assert b.test[key] == pytest.approx(loop.test[key], rel=1e-5, abs=1e-6)
        assert b.batches.keys() == loop.batches.keys()  # the papers' measure, where asked for
        for key in b.batches:
            assert b.batches[key] == pytest.approx(loop.batches[key], rel=1e-5, abs=1e-6)


@requires_compiler
def test_learned_optimizers_run_compiled_on_request_compiling_once_before_the_timed_runs(tmp_path):
    """compile_learned: the seed-by-seed runs of a coordinatewise learned optimizer step through its compiled face,
    one compilation for all seeds (the faces of one learned optimizer share it), done by a dropped one-step run
    before the first seed; the runs equal the eager face's within float32 rounding, and the results say so, run by
    run, so that a suite journaled on one face continues on the other."""
    from torch._dynamo.utils import counters

    suite = evaluate.Suite("compile-test", (evaluate.TaskSpec("q", "quadratic", {"dim": 5, "seed": 0}),), 4,
                           {"hyperadam": {}, "adam": dict(lr=0.05)}, reference="adam")
    lopt = HyperAdam(num_candidates=3)
    eager = evaluate.run_suite(suite, seeds=3, sources={"hyperadam": lopt}, progress=False)
    graphs = counters["stats"]["unique_graphs"]
    compiled = evaluate.run_suite(suite, seeds=3, sources={"hyperadam": lopt}, progress=False, compile_learned=True,
                                  out=tmp_path)
    assert counters["stats"]["unique_graphs"] == graphs + 1  # one graph, for the warm-up: the three seeds reuse it
    assert compiled.meta["compile_learned"] is True and "compile_learned" not in eager.meta
    for a, b in zip(_timeless(eager.runs), _timeless(compiled.runs)):
        assert (a.optimizer, a.seed) == (b.optimizer, b.seed)
        assert a.losses == pytest.approx(b.losses, rel=1e-5, abs=1e-7)
        assert a.hparams == b.hparams  # the face's option is not a hyper-parameter of the run
        assert not a.compiled and b.compiled == (b.optimizer == "hyperadam")
    saved = report.read_results(tmp_path)
    assert saved["meta"]["compile_learned"] is True
    assert [r["compiled"] for r in saved["runs"] if "compiled" in r] == [True] * 3  # left out where False

    # a suite stopped on the eager face continues compiled: the journal takes both, each run says which
    out = tmp_path / "continued"
    with pytest.raises(evaluate.TimeLimitReached):
        evaluate.run_suite(suite, seeds=3, sources={"hyperadam": lopt}, progress=False, out=out, max_minutes=0.0)
    continued = evaluate.run_suite(suite, seeds=3, sources={"hyperadam": lopt}, progress=False, out=out,
                                   compile_learned=True)
    assert [r.compiled for r in continued.runs] == [r.optimizer == "hyperadam" for r in continued.runs]


@pytest.mark.parametrize("name", LEARNED_FACTORIES)
def test_batched_learned_optimizer_equals_the_per_seed_loop(name):
    task = meta_tasks.get_task("quadratic", dim=6, seed=1)
    lopt = LEARNED_FACTORIES[name]()
    assert evaluate.can_batch(task, lopt, {})
    seeds = [0, 1, 2]
    batched = evaluate.train_batched(task, name, lopt, {"lr": 0.01}, seeds, 6, papers_measure=True)
    looped = [evaluate.train(task, name, {"lr": 0.01}, s, 6, lopt, papers_measure=True) for s in seeds]
    _assert_same_runs(batched, looped)
    assert batched[0].losses[0] != batched[1].losses[0]  # different seeds, different starts
    assert all(set(r.batches) == {"loss"} for r in batched + looped)


# ----------------------------------------------------------------------------------------------------------------------
# The papers' measure: the loss of the final weights averaged over the run's batches (HyperAdam Table 1's "final loss")


def _sgd_by_hand(task, seed, steps, lr):
    """Plain SGD written out with torch.optim.SGD from the seed's initial weights and training batches: the per-step
    losses, the final weights and the batches, in order."""
    init_gen, batch_gen = evaluate.runner.seeded_generators(seed, task.device)
    params = {n: p.requires_grad_() for n, p in task.init(init_gen).items()}
    buffers = task.init_buffers()
    opt = torch.optim.SGD(list(params.values()), lr=lr)
    losses, batches = [], []
    for _ in range(steps):
        batch = task.sample_batch(batch_gen)
        opt.zero_grad()
        loss = task.loss(params, batch, buffers)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        batches.append(batch)
    return losses, {n: p.detach() for n, p in params.items()}, batches


def test_the_papers_measure_is_the_final_weights_loss_averaged_over_the_runs_batches():
    task = meta_tasks.get_task("quadratic", dim=6, seed=1)
    run = evaluate.train(task, "sgd", {"lr": 0.05}, seed=2, steps=7, papers_measure=True)
    losses, final, batches = _sgd_by_hand(task, 2, 7, 0.05)
    assert run.losses == pytest.approx(losses, rel=1e-6)  # the same run
    by_hand = sum(float(task.loss(final, b)) for b in batches) / len(batches)
    assert run.batches == {"loss": pytest.approx(by_hand, rel=1e-6)}
    assert report.metric(run, "batches_loss") == run.batches["loss"] != pytest.approx(run.losses[-1], rel=1e-3)
    without = evaluate.train(task, "sgd", {"lr": 0.05}, seed=2, steps=7)
    assert without.batches == {} and math.isnan(report.metric(without, "batches_loss"))
    recording = RecordingTask()
    evaluate.train(recording, "sgd", {"lr": 0.01}, seed=3, steps=4, papers_measure=True)
    assert len(recording.seen) == 8 and recording.seen[4:] == recording.seen[:4]  # the run's batches, in order
    # everything else the run reports is as without the measure
    assert dataclasses.replace(run, batches={}, seconds_per_step=0.0) == \
        dataclasses.replace(without, seconds_per_step=0.0)


@needs_fmnist
@pytest.mark.parametrize("name", ["cnn-1-bn", "cnn-2-dropout"])
def test_the_papers_measure_with_batchnorm_and_dropout_replays_the_training_losses(name):
    """At lr = 0 the final weights are the initial ones, so the measure is the mean of the run's own training losses:
    the replayed batches are normalized by their own statistics (BatchNorm, training mode) and carry the dropout masks
    of training. The run's buffers are left as they were, and so are its held-out metrics."""
    task = evaluate.build_task(name, eval_size=64)
    still = evaluate.train(task, "sgd", {"lr": 0.0}, seed=1, steps=3, papers_measure=True)
    assert still.batches["loss"] == pytest.approx(sum(still.losses) / 3, rel=1e-6)
    run = evaluate.train(task, "sgd", {"lr": 0.05}, seed=1, steps=3, papers_measure=True)
    without = evaluate.train(task, "sgd", {"lr": 0.05}, seed=1, steps=3)
    assert run.losses == without.losses and run.test == without.test
    losses, final, batches = _sgd_by_hand(task, 1, 3, 0.05)
    assert run.losses == pytest.approx(losses, rel=1e-5)
    buffers = task.init_buffers()
    before = {n: b.clone() for n, b in buffers.items()}
    value = evaluate.runner.final_batches_loss(task, final, buffers, 1, 3)
    assert all(torch.equal(buffers[n], before[n]) for n in before)  # replay ran on a copy
    scratch = {n: b.clone() for n, b in buffers.items()}
    with torch.no_grad():
        by_hand = sum(float(task.loss(final, b, scratch)) for b in batches) / 3
    assert value == pytest.approx(by_hand, rel=1e-6) and run.batches["loss"] == pytest.approx(by_hand, rel=1e-4)


class SometimesNaNTask(meta_tasks.Task):
    """f(θ) = log(x)·‖θ‖² with x ~ N(0, 1) per batch: about half the steps have a NaN gradient."""

    name = "sometimes-nan"

    @property
    def device(self):
        return torch.device("cpu")

    def param_shapes(self):
        return {"theta": torch.Size([3])}

    def init(self, generator):
        return {"theta": torch.randn(3, generator=generator)}

    def sample_batch(self, generator, split="train", batch_size=None):
        return meta_tasks.Batch(torch.randn(1, generator=generator), torch.zeros(1))

    def loss(self, params, batch, buffers=None):
        return torch.log(batch.x).sum() * (params["theta"] ** 2).sum()

    def evaluate(self, params, split="test", buffers=None):
        return {"loss": float((params["theta"] ** 2).sum())}


class RecordingTask(SometimesNaNTask):
    """A smooth loss, ‖θ‖²·(1 + x²), that records the training minibatches it is given."""

    def __init__(self):
        self.seen = []

    def loss(self, params, batch, buffers=None):
        if batch.y.shape == (1,):
            self.seen.append(float(batch.x))
        return ((params["theta"] ** 2).sum() * (1 + batch.x ** 2)).sum()

    def sample_batch(self, generator, split="train", batch_size=None):
        batch = super().sample_batch(generator, split, batch_size)
        return batch._replace(y=torch.zeros(1 if split == "train" else 2))


def test_optimizers_with_a_validation_objective_see_the_same_training_batches():
    seen = {}
    for name in ("sgd", "hd-val", "marthe"):  # MARTHE and HD-val also draw validation batches, from their own stream
        task = RecordingTask()
        evaluate.train(task, name, {"lr": 0.01, **({"base": "sgd"} if name != "sgd" else {})}, 3, 4)
        seen[name] = task.seen
    assert len(seen["sgd"]) == 4 and seen["hd-val"] == seen["sgd"] == seen["marthe"]


@pytest.mark.filterwarnings("ignore:.*non-finite:RuntimeWarning")
def test_batched_seeds_skip_nonfinite_steps_like_the_face():
    task = SometimesNaNTask()
    lopt = HyperAdam(num_candidates=2)
    batched = evaluate.train_batched(task, "hyperadam", lopt, {}, [0, 1, 2, 3], 8)
    looped = [evaluate.train(task, "hyperadam", {}, s, 8, lopt) for s in range(4)]
    skipped = [[math.isnan(v) for v in r.losses] for r in looped]
    assert any(map(any, skipped)) and not all(map(all, skipped)) and len(set(map(tuple, skipped))) > 1
    for b, loop in zip(batched, looped):
        torch.testing.assert_close(torch.tensor(b.losses), torch.tensor(loop.losses), rtol=1e-5, atol=1e-7,
                                   equal_nan=True)
        assert b.test["loss"] == pytest.approx(loop.test["loss"], rel=1e-5)


@needs_fmnist
def test_batched_learned_optimizer_equals_the_loop_on_an_mlp():
    task = meta_tasks.get_task("mlp-sigmoid")
    lopt = HyperAdam(num_candidates=2)
    batched = evaluate.train_batched(task, "hyperadam", lopt, {}, [0, 1], 4, splits=("test", "val"))
    looped = [evaluate.train(task, "hyperadam", {}, s, 4, lopt, splits=("test", "val")) for s in (0, 1)]
    _assert_same_runs(batched, looped)
    assert batched[0].val["top1"] == pytest.approx(looped[0].val["top1"], abs=1e-4)


@needs_fmnist
def test_what_cannot_be_batched_runs_per_seed():
    lopt = HyperAdam(num_candidates=2)
    assert not evaluate.can_batch(meta_tasks.get_task("cnn-1-bn"), lopt, {})       # BatchNorm buffers
    assert not evaluate.can_batch(meta_tasks.get_task("cnn-2-dropout"), lopt, {})  # per-batch dropout masks
    mlp = meta_tasks.get_task("mlp-sigmoid")
    assert not evaluate.can_batch(mlp, lopt, {"nonfinite": "raise"})               # only lr maps onto update()
    assert not evaluate.can_batch(mlp, None, {})                                   # hand-designed
    assert not evaluate.can_batch(mlp, _learned_rules().LearnedMuMARTHE(), {})     # needs H·Z and ∇E oracles


# ----------------------------------------------------------------------------------------------------------------------
# Tables, significance, files: numbers against hand computations from the written JSON

QUADRATIC_SUITE = evaluate.Suite(
    "quadratic-test", ("quadratic",), 25,
    {"adam": dict(lr=0.05), "sgd": dict(lr=0.01), "adam-hd": dict(lr=0.05, hypergrad_lr=1e-4)},
    reference="adam", tune={"sgd": (1e-3, 1e-2, 3e-2)}, eval_every=10, record_lr=True)


def test_results_files_match_hand_computations(tmp_path):
    result = evaluate.run_suite(QUADRATIC_SUITE, seeds=6, tune=False, out=tmp_path, progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [f.name for f in result.files] == ["results.json", "table.md", "steps.csv", "finals.csv", "evals.csv",
                                              "curves.png", "schedules.png", "aggregate.json", "aggregate.png"]
    assert all(f.stat().st_size > 0 for f in result.files)
    assert data["meta"]["seeds"] == list(range(6)) and data["meta"]["reference"] == "adam"
    table = (tmp_path / "table.md").read_text()
    finals = {}
    exact = report.runs_from_json(data["runs"])  # the float32 losses are written in float32's shortest decimal
    assert [dataclasses.asdict(r) for r in exact] == [dataclasses.asdict(r) for r in result.runs]
    for label in ("adam", "sgd", "adam-hd"):
        runs = sorted((r for r in exact if r.optimizer == label), key=lambda r: r.seed)
        finals[label] = [r.losses[-1] for r in runs]
        n = len(finals[label])
        mean = sum(finals[label]) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in finals[label]) / (n - 1) / n)
        assert f"| quadratic | {label} | {mean:.4f} ± {se:.4f} |" in table
    for label in ("sgd", "adam-hd"):
        p = scipy.stats.wilcoxon(finals[label], finals["adam"]).pvalue
        row = next(s for s in data["significance"] if s["optimizer"] == label)
        assert row["reference"] == "adam" and row["n"] == 6 and row["p"] == pytest.approx(p, rel=1e-12)
        assert f"| {p:.3g} (adam) |" in table
    assert "| quadratic | adam |" in table and "| reference |" in table

    # steps.csv and finals.csv hold exactly the JSON's numbers
    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 6 * 25
    by_run = {(r.optimizer, r.seed): dataclasses.asdict(r) for r in exact}
    for row in rows:
        run = by_run[(row["optimizer"], int(row["seed"]))]
        assert float(row["loss"]) == run["losses"][int(row["step"])]
        assert float(row["lr"]) == run["lrs"][int(row["step"])]
    with open(tmp_path / "finals.csv") as f:
        for row in csv.DictReader(f):
            run = by_run[(row["optimizer"], int(row["seed"]))]
            assert float(row["final_train_loss"]) == run["losses"][-1]
            assert float(row["test_loss"]) == run["test"]["loss"]
            assert float(row["seconds_per_step"]) == run["seconds_per_step"]
    with open(tmp_path / "evals.csv") as f:
        evals = list(csv.DictReader(f))
    assert len(evals) == 3 * 6 * 2  # steps 10 and 20
    for row in evals:
        point = by_run[(row["optimizer"], int(row["seed"]))]["curve"][int(row["step"]) // 10 - 1]
        assert float(row["test_loss"]) == point["test_loss"]
    # adam-hd adapts its rate, adam does not
    assert len(set(by_run[("adam", 0)]["lrs"])) == 1 and len(set(by_run[("adam-hd", 0)]["lrs"])) > 1
    # a suite without the papers' measure writes nothing of it
    assert not any("batches" in r for r in data["runs"]) and "papers_measure" not in data["meta"]
    assert all(r.batches == {} for r in result.runs) and report.BATCHES_HEADER not in table
    assert "batches_loss" not in (tmp_path / "finals.csv").read_text()


def test_a_suite_with_the_papers_measure_reports_it_beside_the_final_training_loss(tmp_path):
    suite = dataclasses.replace(QUADRATIC_SUITE, papers_measure=True, eval_every=0, record_lr=False)
    result = evaluate.run_suite(suite, seeds=3, steps=6, tune=False, out=tmp_path, progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["papers_measure"] is True and data["meta"]["compare"] == "train_loss"
    assert all(row["metric"] == "train_loss" for row in data["significance"])  # the verdicts' measure is unchanged
    exact = report.runs_from_json(data["runs"])
    assert [r.batches for r in exact] == [r.batches for r in result.runs]
    assert all(set(r.batches) == {"loss"} for r in exact)
    task = evaluate.build_task("quadratic")
    for r in exact[:2]:  # what the runner stored is the runner's measure of the same run, redone
        again = evaluate.train(task, r.optimizer, r.hparams, r.seed, 6, papers_measure=True)
        assert again.batches == r.batches
    table = (tmp_path / "table.md").read_text()
    assert f"| final train loss | {report.BATCHES_HEADER} | test loss |" in table
    for label in ("adam", "sgd", "adam-hd"):
        group = [r for r in exact if r.optimizer == label]
        cells = []
        for values in ([r.losses[-1] for r in group], [r.batches["loss"] for r in group]):
            mean = sum(values) / 3
            cells.append(f"{mean:.4f} ± {math.sqrt(sum((v - mean) ** 2 for v in values) / 2 / 3):.4f}")
        assert f"| quadratic | {label} | {cells[0]} | {cells[1]} |" in table
    with open(tmp_path / "finals.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[3:5] == ["final_train_loss", "batches_loss"]
        by_run = {(r.optimizer, r.seed): r for r in exact}
        for row in reader:
            assert float(row["batches_loss"]) == by_run[(row["optimizer"], int(row["seed"]))].batches["loss"]
    # results without the measure cannot take runs with it: the column would mix the two
    with pytest.raises(experiment.SelectionError, match="papers_measure None there, True here"):
        experiment.check_mergeable({k: v for k, v in data["meta"].items() if k != "papers_measure"}, data["meta"])


def test_the_hyperadam_final_loss_suites_compute_the_papers_measure():
    from metaopt.meta.cli import main_job_suite

    measured = {name for name, suite in evaluate.SUITES.items() if suite.papers_measure}
    assert measured == {"hyperadam-table1", "hyperadam-table2", "hyperadam-depth"}
    assert main_job_suite().papers_measure  # built from hyperadam-table1
    assert all(evaluate.SUITES[name].compare == "train_loss" for name in measured)


COMMITTED = Path(__file__).resolve().parents[1] / "checkpoints" / "results" / "hyperadam-table1-general-campaign-cpu"


@pytest.mark.skipif(report.results_file(COMMITTED) is None, reason="committed result set not present")
def test_results_written_before_the_papers_measure_read_back_and_render_as_committed(tmp_path):
    import gzip

    data = report.read_results(COMMITTED)
    assert not any("batches" in r for r in data["runs"])
    runs = report.runs_from_json(data["runs"])
    assert all(r.batches == {} for r in runs) and report.runs_to_json(runs) == data["runs"]
    meta = data["meta"]
    assert report.markdown_table(runs, meta["reference"], meta["references"], meta["compare"]) in \
        (COMMITTED / "table.md").read_text()
    report.write_csvs(tmp_path, runs)
    assert (tmp_path / "finals.csv").read_bytes() == gzip.open(COMMITTED / "finals.csv.gz").read()


MERGE_SUITE = evaluate.Suite(
    "merge-test", (evaluate.TaskSpec("q1", "quadratic", {"dim": 4, "seed": 0}),
                   evaluate.TaskSpec("q2", "quadratic", {"dim": 4, "seed": 1})), 12,
    {"adam": dict(lr=0.05), "sgd": dict(lr=0.01), "adam-hd": dict(lr=0.05, hypergrad_lr=1e-4)},
    reference="adam", tune={"sgd": (1e-3, 1e-2, 3e-2)})


def _timeless(runs):
    return sorted((dataclasses.replace(r, seconds_per_step=0.0) for r in runs),
                  key=lambda r: (r.task, r.optimizer, r.seed))


class Killed(Exception):
    """Stands for the end of the process (a signal, a session's end) in the middle of a suite."""


def test_an_interrupted_suite_continues_from_its_journal_and_equals_the_run_at_once(tmp_path, monkeypatch):
    from metaopt.evaluate import journal, runner

    whole = evaluate.run_suite(MERGE_SUITE, seeds=2, tune=False, out=tmp_path / "whole", progress=False)
    assert not (tmp_path / "whole" / journal.JOURNAL_FILE).exists()  # removed once the results are written
    out, calls = tmp_path / "out", []
    real_train = runner.train

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 5:  # the third group's first seed: two groups are finished
            raise Killed
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", interrupted)
    with pytest.raises(Killed):
        evaluate.run_suite(MERGE_SUITE, seeds=2, tune=False, out=out, progress=False)
    lines = (out / journal.JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 4 and "protocol" in json.loads(lines[0]) and json.loads(lines[1]) == {"tuned": {}}
    with open(out / journal.JOURNAL_FILE, "a") as f:
        f.write('{"task": "q1", "optimizer": "ad')  # a line the interruption cut: that group runs again
    calls.clear()

    def counted(*args, **kwargs):
        calls.append(args[1])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(runner, "train", counted)
    resumed = evaluate.run_suite(MERGE_SUITE, seeds=2, tune=False, out=out, progress=False)
    assert len(calls) == 2 * 4  # the four groups left, two seeds each: the finished two were not rerun
    assert _timeless(resumed.runs) == _timeless(whole.runs)
    assert _timeless(report.runs_from_json(report.read_results(out)["runs"])) == _timeless(whole.runs)
    assert not (out / journal.JOURNAL_FILE).exists()

    # a journal of another protocol is refused, naming the difference, and left as it is
    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(runner, "train", killed)
    with pytest.raises(Killed):
        evaluate.run_suite(MERGE_SUITE, seeds=2, tune=False, out=out, progress=False)
    monkeypatch.setattr(runner, "train", real_train)
    with pytest.raises(evaluate.SelectionError, match=r"another protocol \(seeds: \[0, 1\] there, \[0, 1, 2\] now"):
        evaluate.run_suite(MERGE_SUITE, seeds=3, tune=False, out=out, progress=False)
    assert (out / journal.JOURNAL_FILE).exists()


@needs_fmnist
def test_an_interrupted_lrs_opt_continues_from_its_journal_seed_by_seed(tmp_path, monkeypatch):
    """LRS-OPT (marthe-schedules) is journaled seed by seed: after an interruption in its second seed, the same call
    reruns that seed only, and the results equal the run at once; a time limit stops it between seeds."""
    from metaopt.evaluate import journal, runner

    options = dict(optimizers=["sgd"], seeds=2, steps=3, tune=False, lrs_seeds=2, lrs_outer_steps=1, progress=False)
    whole = evaluate.run_suite("marthe-schedules", out=tmp_path / "whole", **options)
    out, calls = tmp_path / "out", []
    real = runner.optimize_schedule

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "optimize_schedule", interrupted)
    with pytest.raises(Killed):
        evaluate.run_suite("marthe-schedules", out=out, **options)
    records = [json.loads(line) for line in (out / journal.JOURNAL_FILE).read_text().splitlines()]
    assert [r["lrs"]["seed"] for r in records if "lrs" in r] == [0]
    assert records[0]["protocol"]["lrs_opt"]["outer_steps"] == 1
    calls.clear()
    resumed = evaluate.run_suite("marthe-schedules", out=out, **options)
    assert len(calls) == 1  # seed 1 only
    assert _timeless(resumed.runs) == _timeless(whole.runs)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.lrs_opt] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in whole.lrs_opt]
    assert not (out / journal.JOURNAL_FILE).exists()

    # another number of LRS-OPT iterations is another protocol
    monkeypatch.setattr(runner, "optimize_schedule", real)
    limited = tmp_path / "limited"
    with pytest.raises(evaluate.TimeLimitReached):
        evaluate.run_suite("marthe-schedules", out=limited, max_minutes=1e-9, **options)
    with pytest.raises(evaluate.SelectionError, match="lrs_opt"):
        evaluate.run_suite("marthe-schedules", out=limited, **{**options, "lrs_outer_steps": 2})

    # a time limit (stop) is asked before each seed; finished seeds are taken as they are
    suite = evaluate.SUITES["marthe-schedules"]
    spec = suite.task_specs[0]
    task = evaluate.build_task(spec)
    config = dataclasses.replace(suite.lrs_opt, seeds=2, outer_steps=1)
    seen = []
    with pytest.raises(runner.Stopped, match="stopped after 1 of 2"):
        runner.run_lrs_opt(spec.label, spec, task, config, [0, 1], 3, progress=False,
                           on_seed=lambda run, record: seen.append((run, record)), stop=lambda: bool(seen))
    calls.clear()
    monkeypatch.setattr(runner, "optimize_schedule", interrupted)
    runs, records = runner.run_lrs_opt(spec.label, spec, task, config, [0, 1], 3, progress=False,
                                       finished={(spec.label, 0): seen[0]})
    assert len(calls) == 1 and runs[0] is seen[0][0] and records[0] is seen[0][1] and records[1]["seed"] == 1


def test_a_time_limit_stops_a_suite_cleanly_and_the_same_command_finishes_it(tmp_path, capsys):
    from metaopt.evaluate import journal
    from metaopt.evaluate.cli import main

    out = tmp_path / "out"
    with pytest.raises(evaluate.TimeLimitReached, match="after 0 of 6 run groups; the finished ones are journaled"):
        evaluate.run_suite(MERGE_SUITE, seeds=2, out=out, progress=False, max_minutes=1e-9)
    records = [json.loads(line) for line in (out / journal.JOURNAL_FILE).read_text().splitlines()]
    assert set(records[1]["tuned"]["q1"]) == {"sgd"}  # tuning is kept: the next piece does not repeat it
    done = evaluate.run_suite(MERGE_SUITE, seeds=2, out=out, progress=False)
    assert done.tuned == records[1]["tuned"] and len(done.runs) == 2 * 3 * 2
    assert not (out / journal.JOURNAL_FILE).exists()

    argv = ["--suite", "hyperadam-table1", "--optimizers", "adam", "--tasks", "quadratic", "--seeds", "1",
            "--steps", "2", "--no-tune", "--out", str(tmp_path / "cli"), "--quiet"]
    assert main([*argv, "--max-minutes", "1e-9"]) == 3
    assert "Run the same command again to continue." in capsys.readouterr().err
    assert main(argv) == 0 and report.results_file(tmp_path / "cli") is not None


def test_a_suite_run_in_pieces_and_merged_equals_the_suite_run_at_once(tmp_path, monkeypatch):
    whole = evaluate.run_suite(MERGE_SUITE, seeds=4, out=tmp_path / "whole", progress=False)
    out = tmp_path / "pieces"
    pieces = [dict(optimizers=["sgd"], tasks=["q1"], seeds=4),          # nothing there yet: an ordinary run
              dict(optimizers=["adam", "adam-hd"], seeds=[0, 1]),      # by optimizer
              dict(optimizers=["adam", "adam-hd"], seeds=[2, 3]),      # by seed
              dict(optimizers=["sgd"], tasks=["q2"], seeds=4)]         # by task
    for i, piece in enumerate(pieces):
        merged = evaluate.run_suite(MERGE_SUITE, out=out, merge=True, progress=False, command=["piece", str(i)],
                                    **piece)

    def key(r):
        return r.task, r.optimizer, r.seed

    def timeless(runs):
        return sorted((dataclasses.replace(r, seconds_per_step=0.0) for r in runs), key=key)

    assert timeless(merged.runs) == timeless(whole.runs)
    assert timeless(report.runs_from_json(report.read_results(out)["runs"])) == timeless(whole.runs)
    assert sorted(merged.significance, key=lambda s: (s["task"], s["optimizer"])) == \
        sorted(whole.significance, key=lambda s: (s["task"], s["optimizer"]))
    assert merged.tuned == whole.tuned and merged.meta["seeds"] == [0, 1, 2, 3]
    assert list(merged.meta["tasks"]) == ["q1", "q2"] and merged.meta["references"] == whole.meta["references"]
    assert merged.meta["earlier_commands"] == [["piece", "0"], ["piece", "1"], ["piece", "2"]]
    assert merged.meta["command"] == ["piece", "3"]

    # a rerun replaces the runs it repeats
    again = evaluate.run_suite(MERGE_SUITE, out=out, merge=True, progress=False, optimizers=["adam"], seeds=[1])
    assert timeless(again.runs) == timeless(whole.runs)
    # refused: another protocol, or a pair rerun at another rate than the kept runs used
    with pytest.raises(evaluate.SelectionError, match="steps 12 there, 5 here"):
        evaluate.run_suite(MERGE_SUITE, out=out, merge=True, progress=False, steps=5, seeds=1, optimizers=["adam"])
    with pytest.raises(evaluate.SelectionError, match="learning rate differs .* sgd on q1"):
        evaluate.run_suite(MERGE_SUITE, out=out, merge=True, progress=False, seeds=[0], tasks=["q1"], tune=False,
                           optimizers={"sgd": {"lr": 0.123}})
    assert not (out / "journal.jsonl").exists()  # refused after it ran: nothing kept that would block the next piece
    # a rate retuned to another value is refused before anything runs
    payload = report.read_results(out)
    payload["tuned"]["q2"]["sgd"]["lr"] = 0.5
    report.write_json(out / "results.json", payload)
    monkeypatch.setattr(experiment, "run_grid", lambda *a, **k: pytest.fail("ran a piece that cannot be merged"))
    with pytest.raises(evaluate.SelectionError, match=r"sgd on q2 \(0.5 there"):
        evaluate.run_suite(MERGE_SUITE, out=out, merge=True, progress=False, seeds=[0], optimizers=["sgd"])
    with pytest.raises(evaluate.SelectionError, match="dataset 'fashion-mnist' there, 'mnist' here"):
        evaluate.run_suite(MERGE_SUITE, out=out, merge=True, progress=False, seeds=[0], dataset="mnist")
    with pytest.raises(evaluate.SelectionError, match="merge needs out"):
        evaluate.run_suite(MERGE_SUITE, merge=True, progress=False, seeds=1)
    assert timeless(report.runs_from_json(report.read_results(out)["runs"])) == timeless(whole.runs)  # untouched


def test_a_suite_that_tunes_in_hindsight_tunes_on_the_evaluation_seeds(tmp_path):
    suite = dataclasses.replace(MERGE_SUITE, tune_in_hindsight=True, tune={"adam": (0.01, 0.05, 0.2)})
    result = evaluate.run_suite(suite, seeds=3, optimizers=["adam"], out=tmp_path / "r", progress=False)
    assert result.meta["tuned_on_seeds"] == [0, 1, 2]
    for task in ("q1", "q2"):
        chosen = result.tuned[task]["adam"]
        finals = [r.losses[-1] for r in result.runs if r.task == task]
        # the evaluation runs are the tuning runs of the chosen rate: their mean is the grid's best objective
        assert sum(finals) / 3 == pytest.approx(min(chosen["objective"]), rel=1e-12)
    assert "### Learning rates tuned in hindsight, on the evaluation seeds" in result.report
    from metaopt.evaluate import results as rs
    assert "chosen per task in hindsight, on the evaluation seeds themselves" in rs.render_results(tmp_path)


def test_float32_losses_are_written_short_and_read_back_exactly():
    f32 = [float(torch.tensor(v, dtype=torch.float32)) for v in (16.33769989, 0.1, 2.5e-8, 1234567.0)]
    f64 = [0.1, 1 / 3]  # not float32 values: written as they are
    runs = [evaluate.Run("adam", "t", 0, f32 + [float("nan"), float("inf")], 0.01, {"loss": 0.5},
                         lrs=[1e-3, 1e-3 * 2 ** 0.5]),
            evaluate.Run("sgd", "t", 0, f64, 0.01, {})]
    records = report.runs_to_json(runs)
    assert records[0]["float32"] == ["losses"] and "float32" not in records[1]  # the √2 rate is float64
    assert records[0]["losses"][0] == 16.3377 and records[0]["losses"][1] == 0.1 != f32[1]
    assert records[1]["losses"] == f64 and records[0]["lrs"] == runs[0].lrs
    back = report.runs_from_json(json.loads(json.dumps(records)))
    assert back[0].losses[:4] == f32 and math.isnan(back[0].losses[4]) and back[0].losses[5] == math.inf
    assert back[1] == runs[1] and back[0].lrs == runs[0].lrs
    assert report.runs_from_json([dataclasses.asdict(runs[1])]) == [runs[1]]  # records written before the encoding


def test_heatmap_grids_put_each_series_mean_in_its_task_row_and_x_column(tmp_path):
    points = [{"panel": t, "series": series, "x": x, "mean": mean, "se": 0.0, "optimizer": f"{series} {x}"}
              for series, offset in (("tlr", 0.0), ("sgd", 1.0)) for t, bs in (("bs64", 0.1), ("bs512", 0.2))
              for x, mean in ((0.1, 0.3 + bs + offset), (0.001, 0.5 + bs + offset))]
    points[0]["mean"] = float("nan")  # a diverged cell
    grids = report.heatmap_grids(points)
    rows, cols, cells = grids["tlr"]
    assert rows == ["bs64", "bs512"] and cols == [0.001, 0.1]
    assert math.isnan(cells[0][1]) and cells[0][0] == 0.6 and cells[1] == [0.7, 0.5]
    assert grids["sgd"][2] == [[1.6, 1.4], [1.7, 1.5]]
    path = report.plot_heatmaps(points, suites.Sweep("initial learning rate", "train_loss", heatmap=True),
                                tmp_path / "heatmap.png")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("n", [3, 14, 30])
def test_every_label_of_a_figure_has_its_own_look(n):
    styles = report._styles([f"opt{i}" for i in range(n)] + ["opt0"])
    looks = [tuple(sorted((k, str(v)) for k, v in style.items())) for style in styles.values()]
    assert len(styles) == n and len(set(looks)) == n


def test_mean_se_and_wilcoxon_edge_cases():
    assert evaluate.mean_se([1.0, 2.0, 3.0]) == (2.0, pytest.approx(math.sqrt(1 / 3)), 3)
    mean, se, n = evaluate.mean_se([1.0, float("nan"), float("inf"), 3.0])  # diverged runs are left out and counted
    assert (mean, n) == (2.0, 2) and se == pytest.approx(1.0)
    assert evaluate.paired_wilcoxon([1.0, 2.0], [1.0, 2.0]) == 1.0
    a, b = [0.3, 0.5, 0.2, 0.9, 0.4], [0.1, 0.6, 0.1, 0.5, 0.2]
    assert evaluate.paired_wilcoxon(a, b) == scipy.stats.wilcoxon(a, b).pvalue
    assert evaluate.paired_wilcoxon(a + [float("nan")], b + [0.0]) == scipy.stats.wilcoxon(a, b).pvalue
    run = evaluate.Run("x", "t", 0, [1.0, float("nan")], 0.1, {})
    assert "| diverged (1/1) |" in report.markdown_table([run])
    assert "(1/2 diverged)" in report.markdown_table([run, evaluate.Run("x", "t", 1, [1.0, 0.5], 0.1, {})])


def test_tuning_picks_the_best_rate_on_separate_seeds(tmp_path):
    result = evaluate.run_suite(QUADRATIC_SUITE, optimizers=["sgd", "adam"], seeds=2, tune_seeds=2, out=tmp_path,
                                progress=False)
    task = meta_tasks.get_task("quadratic")

    def objective(lr):
        return sum(evaluate.train(task, "sgd", {"lr": lr}, evaluate.TUNE_SEED_OFFSET + i, 25, splits=()).losses[-1]
                   for i in range(2)) / 2

    coarse = {lr: objective(lr) for lr in QUADRATIC_SUITE.tune["sgd"]}
    best = min(coarse, key=coarse.get)  # then its neighbours a factor sqrt(2) away
    tried = {**coarse, **{lr: objective(lr) for lr in (best / math.sqrt(2), best * math.sqrt(2))}}
    grid = sorted(tried)
    chosen = min(grid, key=tried.get)
    tuned = result.tuned["quadratic"]["sgd"]
    assert tuned["grid"] == pytest.approx(grid, rel=1e-12) and len(grid) == len(coarse) + 2
    assert tuned["lr"] == pytest.approx(chosen) and tuned["objective"] == pytest.approx([tried[lr] for lr in grid],
                                                                                      rel=1e-12)
    assert all(r.hparams["lr"] == chosen and r.seed in (0, 1) for r in result.runs if r.optimizer == "sgd")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["tuned"]["quadratic"]["sgd"]["lr"] == chosen and data["meta"]["tuned_on_seeds"] == [10_000, 10_001]
    assert f"| quadratic | sgd | {chosen:g} |" in (tmp_path / "table.md").read_text()


def test_missing_checkpoints_are_listed_together(tmp_path):
    with pytest.raises(evaluate.MissingCheckpoints) as err:
        evaluate.run_suite("hyperadam-ablation", checkpoints=tmp_path, seeds=1, steps=1, progress=False)
    assert set(err.value.missing) == set(suites.ABLATION_CHECKPOINTS)
    assert all(f"{label}: no config.json" in str(err.value) for label in suites.ABLATION_CHECKPOINTS)
    with pytest.raises(SystemExit, match="hyperadam-no-lstm-no-preprocess"):
        evaluate.main(["--suite", "hyperadam-ablation", "--checkpoints", str(tmp_path), "--seeds", "1"])


def test_the_ablation_looks_for_its_variants_in_their_own_subdirectory(tmp_path, monkeypatch):
    monkeypatch.setenv("METAOPT_CHECKPOINTS", str(tmp_path))
    with pytest.raises(evaluate.MissingCheckpoints) as err:
        evaluate.run_suite("hyperadam-ablation", seeds=1, steps=1, progress=False)
    assert err.value.missing["hyperadam-J5"] == tmp_path / "hyperadam-ablation" / "hyperadam-J5"


@needs_fmnist
def test_checkpoints_are_loaded_by_label_and_missing_ones_can_be_skipped(tmp_path):
    lopt = HyperAdam(num_candidates=2)
    lopt.save_pretrained(tmp_path / "hyperadam")
    result = evaluate.run_suite("hyperadam-ablation", checkpoints=tmp_path, skip_missing=True, seeds=2, steps=2,
                                tasks=["mlp-3"], progress=False)
    assert {r.optimizer for r in result.runs} == {"hyperadam"}
    assert set(result.skipped) == set(suites.ABLATION_CHECKPOINTS) - {"hyperadam"}
    assert result.meta["sources"]["hyperadam"] == str(tmp_path / "hyperadam")
    weights = (tmp_path / "hyperadam" / "model.safetensors").read_bytes()
    assert result.meta["checkpoints"] == {"hyperadam": {"path": (tmp_path / "hyperadam").resolve().as_posix(),
                                                        "weights_sha256": hashlib.sha256(weights).hexdigest(),
                                                        "golden_loss": None}}
    fresh = evaluate.train(meta_tasks.get_task("mlp-deep", depth=3), "x", {}, 1, 2, lopt)
    assert result.runs[1].losses == pytest.approx(fresh.losses, rel=1e-5)


def test_a_label_mapped_to_a_learned_name_loads_its_checkpoint_and_tunes_its_step(tmp_path):
    lopt = HyperAdam(num_candidates=2)
    lopt.save_pretrained(tmp_path / "hyperadam")
    label = suites.HYPERADAM_TUNED
    result = evaluate.run_suite("hyperadam-table2", checkpoints=tmp_path, optimizers=[label], tasks=["lstm-sine"],
                                seeds=2, steps=3, tune_seeds=1, progress=False)
    assert result.meta["checkpoints"][label]["path"] == (tmp_path / "hyperadam").resolve().as_posix()
    chosen = result.tuned["lstm-sine"][label]
    assert chosen["lr"] in chosen["grid"] and set(suites.HYPERADAM_LR_GRID) <= set(chosen["grid"])
    assert chosen["objective"][chosen["grid"].index(chosen["lr"])] == min(chosen["objective"])
    run = result.runs[0]
    assert run.hparams["lr"] == chosen["lr"]
    fresh = evaluate.train(evaluate.build_task(evaluate.SUITES["hyperadam-table2"].task_specs[0]), "x",
                           {"lr": chosen["lr"]}, 0, 3, lopt)
    assert run.losses == pytest.approx(fresh.losses, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Every suite, reduced


def _instances(suite):
    """Fresh learned optimizers for the suite's learned labels (no checkpoints are committed)."""
    made = {}
    for label in suite.learned:
        if label.startswith("hyperadam"):
            made[label] = HyperAdam(num_candidates=2, use_lstm="no-lstm" not in label,
                                    preprocess="no-preprocess" not in label)
        elif label in ("dm", "rnnprop"):
            made[label] = {"dm": DMOptimizer, "rnnprop": RNNprop}[label]()
        elif label == "cam-hd-learned-gamma":
            made[label] = _learned_rules().LearnedGammaCAMHD()
        elif label == "marthe-learned-mu":
            made[label] = _learned_rules().LearnedMuMARTHE()
    return made


CHEAP_TO_TUNE = ("hyperadam-table1", "hyperadam-table2")


@pytest.mark.parametrize("name", list(evaluate.SUITES))
def test_every_suite_runs_in_reduced_form(name, tmp_path):
    suite = evaluate.SUITES[name]
    if name != "hyperadam-table2" and datasets.find_dataset("fashion-mnist") is None:
        pytest.skip("real Fashion-MNIST not installed (bash .ci/setup)")
    result = evaluate.run_suite(suite, seeds=2, steps=2, quick=True, tune=name in CHEAP_TO_TUNE, tune_seeds=1,
                                eval_size=64, sources=_instances(suite), out=tmp_path, progress=False,
                                batched=True)  # the vmapped path (CUDA's default) in reduced form too
    labels = suite.quick_optimizers or tuple(suite.optimizers)
    tasks = suite.quick_tasks or tuple(s.label for s in suite.task_specs)
    lrs_runs = len(tasks) * min(2, suite.lrs_opt.seeds) if suite.lrs_opt else 0
    assert len(result.runs) == len(labels) * len(tasks) * 2 + lrs_runs
    assert all(len(r.losses) == 2 and r.test for r in result.runs)
    for r in result.runs:  # identical initial weights and first batch for every optimizer of a task and seed
        first = next(q for q in result.runs if q.task == r.task and q.seed == r.seed)
        assert r.losses[0] == pytest.approx(first.losses[0], rel=1e-6)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["suite"] == name and len(data["runs"]) == len(result.runs)
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "table.md").read_text().startswith("## ")
    if suite.sweep is not None:
        assert result.sweep and (tmp_path / "sweep.png").is_file()
    if name in CHEAP_TO_TUNE:
        assert set(result.tuned[tasks[0]]) == set(suite.tune) & set(labels)
    assert all(bool(r.batches) == suite.papers_measure for r in result.runs)
    default, pairs = evaluate.experiment.reference_map(suite, labels, None)
    for row in result.significance:
        assert row["reference"] == pairs.get(row["optimizer"], default) and row["metric"] == suite.compare
    _check_suite_specifics(name, result)


def _check_suite_specifics(name, result):
    if name == "hypergrad-combination":  # CAM-HD's levels follow the task (Sec. 4.1)
        levels = {r.task: tuple(r.hparams["levels"]) for r in result.runs}
        assert levels == {"ffnn-100x3": ("layer", "global"), "lenet5": ("unit", "global")}
    if name == "tlr-robustness":  # TLR's window is a third of this task's epoch; pairs at the same initial rate
        for r in result.runs:
            if r.optimizer.startswith("tlr"):
                bs = int(r.task.split("bs")[1])
                assert r.hparams["steps_per_epoch"] == math.ceil(55_000 / bs)
        assert all(row["reference"] == "tlr lr=" + row["optimizer"].split("lr=")[1].split()[0]
                   for row in result.significance)
        heatmap = next(f for f in result.files if f.name == "heatmap.png")  # TLR Figs. 1-2: one grid per method
        assert heatmap.stat().st_size > 1000
        grids = report.heatmap_grids(result.sweep)
        assert set(grids) == {p["series"] for p in result.sweep}
        for rows, cols, cells in grids.values():
            assert rows == list(dict.fromkeys(r.task for r in result.runs)) and cols == sorted(cols)
            assert len(cells) == len(rows) and all(len(row) == len(cols) for row in cells)
    if name == "marthe-schedules":  # LRS-OPT starts from the online methods' weights and sees their batches
        task = evaluate.build_task(evaluate.SUITES[name].task_specs[0])
        assert (len(task.data.train), len(task.data.val)) == (7000, 700)
        lrs = [r for r in result.runs if r.optimizer == "lrs-opt"]
        sgd = {r.seed: r for r in result.runs if r.optimizer == "sgd"}
        assert lrs and all(r.losses[0] == sgd[r.seed].losses[0] for r in lrs)
        for r, record in zip(lrs, result.lrs_opt):
            assert r.lrs == record["schedule"] and min(r.lrs) >= 0 and len(record["val_losses"]) == 2
        assert (result.files[-1].name == "schedules.png") and all(r.lrs for r in result.runs)
    if name in ("hyperadam-table1", "hyperadam-depth"):  # learned optimizers ran all seeds at once
        assert all(r.batched == (r.optimizer == "hyperadam") for r in result.runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_table1_runs_on_cuda_with_batched_learned_seeds(tmp_path):
    if datasets.find_dataset("fashion-mnist") is None:
        pytest.skip("real Fashion-MNIST not installed (bash .ci/setup)")
    suite = evaluate.SUITES["hyperadam-table1"]
    result = evaluate.run_suite(suite, seeds=3, steps=5, quick=True, tune=False, device="cuda",
                                sources=_instances(suite), out=tmp_path, progress=False)
    assert any(r.batched for r in result.runs)
    assert all(math.isfinite(r.losses[-1]) for r in result.runs)
