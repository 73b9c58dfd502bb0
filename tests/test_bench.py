"""The benchmark harness: its statistics, the roofline arithmetic, the byte models against the optimizers' own state,
the quick run's report (what CI runs), and the Markdown table for the README."""

import copy
import json
import math
import statistics

import numpy as np
import pytest
import torch

import metaopt
from meta_tasks import datasets
from metaopt import bench
from metaopt.learned import LEARNED_NAMES, DMOptimizer, HyperAdam, RNNprop
from metaopt.registry import records

HAS_FMNIST = datasets.find_dataset("fashion-mnist") is not None


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # main() restores what --quick changed
    return json.loads(out.read_text())


def _numbers(tree, path=()):
    """Every (path, number) in a JSON tree; booleans are not numbers here."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, path + (key,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, path + (i,))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


# -- statistics -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [[3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0], [0.2, 0.7, 0.1, 0.4, 0.3],
                                  [2.0, 1.0]])
def test_summarize_matches_statistics_and_numpy(data):
    summary = bench.summarize(data)
    assert summary["median_s"] == pytest.approx(statistics.median(data), rel=1e-12)
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    assert (summary["q1_s"], summary["q3_s"]) == pytest.approx((q1, q3), rel=1e-12)
    assert (summary["q1_s"], summary["q3_s"]) == pytest.approx(tuple(np.percentile(data, [25, 75])), rel=1e-12)
    assert summary["iqr_s"] == pytest.approx(q3 - q1, rel=1e-12)
    assert summary["min_s"] == min(data) and summary["n"] == len(data)


def test_summarize_known_values_and_edge_cases():
    assert bench.summarize([1.0, 2.0, 3.0, 4.0]) == {"median_s": 2.5, "min_s": 1.0, "q1_s": 1.75, "q3_s": 3.25,
                                                     "iqr_s": 1.5, "n": 4}
    assert bench.summarize([0.5]) == {"median_s": 0.5, "min_s": 0.5, "q1_s": 0.5, "q3_s": 0.5, "iqr_s": 0.0, "n": 1}
    with pytest.raises(ValueError):
        bench.summarize([])


# -- byte models ----------------------------------------------------------------------------------------------------


def test_learned_byte_models_count_the_state_of_the_papers():
    hyperadam = bench.learned_byte_model(HyperAdam(num_candidates=20))
    assert hyperadam.state == 6 * 20 and hyperadam.reductions == 1 + 20  # 6J floats; rms(g), rms(m) pre-pass
    assert hyperadam.floats_per_coordinate == 3 + 2 * 120 + 21
    assert bench.learned_byte_model(DMOptimizer()).state == 2 * 2 * 20
    assert bench.learned_byte_model(RNNprop()).state == 2 * 2 * 20 + 2
    assert bench.ByteModel(2, 0, "m, v").bytes_per_step(1000) == 7 * 1000 * 4


def test_every_registered_optimizer_without_closure_has_a_byte_model():
    param = torch.nn.Parameter(torch.zeros(3))
    for name in metaopt.OPTIMIZERS:
        if name in LEARNED_NAMES:
            continue
        opt = metaopt.make_optimizer(name, [("w", param)])
        if not getattr(opt, "requires_closure", False):
            assert name in bench.HAND_DESIGNED_BYTES, f"declare the byte model of {name!r} in HAND_DESIGNED_BYTES"


def test_the_bench_reads_each_memory_model_from_the_registry_record():
    """Every record's memory model (stated at its registration) is the byte model the bench times the name against;
    a record has one unless its step evaluates the loss itself or it is learned (configuration-dependent)."""
    param = torch.nn.Parameter(torch.zeros(3))
    for entry in records():
        assert (entry.memory is None) == (entry.needs.closure or entry.kind == "learned"), entry.name
        if entry.memory is None:
            assert entry.name not in bench.HAND_DESIGNED_BYTES
            continue
        model = bench.HAND_DESIGNED_BYTES[entry.name]
        assert (model.state, model.reductions, model.basis) == (entry.memory.state, entry.memory.reductions,
                                                                entry.memory.basis)
        assert model.floats_per_coordinate == entry.memory.floats_per_coordinate
        assert bench.build_optimizer(entry.name, [("w", param)])[1] == model
    assert set(bench.HAND_DESIGNED_BYTES) == {e.name for e in records() if e.memory is not None} | set(bench.TORCH_ADAM)


def test_config_validates_its_fields():
    with pytest.raises(ValueError, match="Invalid sections"):
        bench.BenchConfig(sections=("step", "nope"))
    with pytest.raises(ValueError, match="Invalid repeats"):
        bench.BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="Invalid variants"):
        bench.BenchConfig(variants=("flat", "fused"))
    assert bench.BenchConfig(quick=True).learned_variants == ("reference", "flat")
    assert bench.BenchConfig().learned_variants == tuple(bench.LEARNED_VARIANTS)
    with pytest.raises(SystemExit, match="Invalid sections"):
        bench.main(["--only", "steps", "--device", "cpu"])


# -- the quick run --------------------------------------------------------------------------------------------------


def test_quick_report_structure(quick_report):
    env = quick_report["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["device_name"]
    assert env["date"] and "git_commit" in env
    assert set(quick_report["sections"]) == set(bench.SECTIONS)
    assert quick_report["settings"]["quick"] and quick_report["settings"]["repeats"] == 2
    names, _ = bench.optimizer_names(torch.device("cpu"))
    assert {"hyperadam", "dm", "rnnprop", "torch-adam-foreach"} <= set(names)
    assert quick_report["settings"]["variants"] == ["reference", "flat"]  # no compiling in a quick run
    # each learned optimizer once per variant of its face, the others once
    cases = [f"{n}[{v}]" for n in names if n in bench.FRESH_LEARNED for v in ("reference", "flat")]
    cases += [n for n in names if n not in bench.FRESH_LEARNED]
    step_rows = {r["key"]: r for r in quick_report["sections"]["step"]["rows"]}
    assert set(step_rows) == {f"step:{c}:mlp-9x20" for c in cases}
    for row in step_rows.values():
        assert "error" not in row and row["time_s"]["n"] == 2
        if row["includes_closure"]:
            assert "roofline_s" not in row  # a whole step with its forward/backward passes has no memory roofline
        else:
            assert row["ratio_to_roofline"] > 0
    assert {r["optimizer"] for r in step_rows.values() if r["includes_closure"]} >= {"marthe", "rtho", "tlr-naive"}
    iteration = {r["optimizer"]: r for r in quick_report["sections"]["iteration"]["rows"]}
    assert set(iteration) == set(cases)
    assert iteration["torch-adam-foreach"]["ratio_to_adam"] == 1.0
    for name, row in iteration.items():
        assert row["ratio_to_adam"] == pytest.approx(
            row["time_s"]["median_s"] / iteration["torch-adam-foreach"]["time_s"]["median_s"])
        if name in bench.BASE_OPTIMIZER:
            base = bench.BASE_OPTIMIZER[name]
            assert row["base"] == base and row["ratio_to_base"] == pytest.approx(
                row["time_s"]["median_s"] / iteration[base]["time_s"]["median_s"])
    assert {t["key"] for t in quick_report["targets"]} == {t.key for t in bench.TARGETS}
    assert all(t["passed"] is None for t in quick_report["targets"])  # quick reports are not judged
    judged = {t["key"]: t for t in quick_report["targets"]}
    # a learned optimizer's target is judged on its best variant
    variants = {v: step_rows[f"step:hyperadam[{v}]:mlp-9x20"]["time_s"]["median_s"] for v in ("reference", "flat")}
    best = min(variants, key=variants.get)
    assert judged["step:hyperadam:mlp-9x20"]["measured"] == variants[best]
    assert judged["step:hyperadam:mlp-9x20"]["variant"] == best
    assert judged["step:hyperadam:mlp-9x20"]["row"] == f"step:hyperadam[{best}]:mlp-9x20"
    assert judged["step:hyperadam:resnet18"]["measured"] is None  # not at quick sizes
    assert quick_report["anchors"] == bench.ANCHORS


def test_quick_report_times_every_face_against_its_baseline(quick_report):
    """The faces section: every registered optimizer on the small MLP, timed beside its baseline (torch counterpart,
    base optimizer, SGD iteration) or against its compute floor; targets listed but not judged at quick sizes."""
    from metaopt.bench import faces

    section = quick_report["sections"]["faces"]
    rows = {r["optimizer"]: r for r in section["rows"]}
    assert set(rows) == set(metaopt.OPTIMIZERS)
    assert section["gemm"]["flops_per_s"] == pytest.approx(2 * faces.GEMM_SIZE**3 / section["gemm"]["time_s"]["median_s"])
    for name, row in rows.items():
        assert row["learner"] == "mlp-784-20-10" and row["num_params"] == 15_910 and "error" not in row
        baseline, limit = faces.comparison(name)
        assert row["baseline"] == baseline.name
        if baseline.floor:
            assert row["flops_per_coordinate"] > 0
            assert row["floor_s"] == pytest.approx(row["flops_per_coordinate"] * 15_910 / section["gemm"]["flops_per_s"])
            assert row["ratio"] == pytest.approx(row["time_s"]["median_s"] / row["floor_s"])
        else:
            assert row["ratio"] == pytest.approx(row["time_s"]["median_s"] / row["baseline_time_s"]["median_s"])
        assert row["includes_closure"] == baseline.iteration
        assert ("target" in row) == (limit is not None)
        if limit is not None:
            assert row["target"]["limit"] == limit and row["passed"] is None  # quick: not judged
    assert rows["adam-hd"]["baseline"] == "torch Adam" and rows["adam-hd"]["target"]["limit"] == 1.3
    assert rows["hyperadam"]["flops_per_coordinate"] == 10_440  # the 10.4 kFLOP per coordinate at J = 20
    assert rows["marthe"]["baseline"].startswith("SGD iteration")
    table = bench.markdown_report(quick_report)
    assert "| adam-hd | torch Adam | " in table and "| ≤ 1.3× baseline |" in table


def test_faces_judge_each_target_and_the_table_shows_it():
    from metaopt.bench import faces

    rows = [{"optimizer": "sgd-hd", "learner": "m", "includes_closure": False, "baseline": "torch SGD",
             "time_s": {"median_s": 2e-3}, "baseline_time_s": {"median_s": 1e-3}, "ratio": 2.0,
             "target": {"limit": 1.3, "text": "≤ 1.3× baseline"}},
            {"optimizer": "hyperadam", "learner": "m", "includes_closure": False, "baseline": "compute floor",
             "time_s": {"median_s": 3e-3}, "floor_s": 2e-3, "ratio": 1.5,
             "target": {"limit": 2.0, "text": "≤ 2× floor"}}]
    for row in rows:
        faces.judge(row, quick=False)
    assert [r["passed"] for r in rows] == [False, True]
    table = "\n".join(faces.faces_markdown({"gemm": {"flops_per_s": 1e11, "size": 1024}, "rows": rows}))
    assert "| sgd-hd | torch SGD | 2 ms, 2×, FAIL | ≤ 1.3× baseline |" in table
    assert "| hyperadam | compute floor | 3 ms, 1.5×, pass | ≤ 2× floor |" in table
    with pytest.raises(KeyError, match="COMPARISONS"):
        faces.comparison("no-such-optimizer")


@pytest.mark.skipif(not HAS_FMNIST, reason="real Fashion-MNIST not installed (bash .ci/setup)")
def test_quick_report_measures_meta_training_and_table1(quick_report):
    meta = {r["key"]: r for r in quick_report["sections"]["meta"]["rows"]}
    assert set(meta) == {"meta:K=1", "meta:K=2", "meta:K=2[reference]", "meta:dm-paper:K=2", "meta:rnnprop-paper:K=2",
                         "meta:dm-paper:K=2[reference]", "meta:rnnprop-paper:K=2[reference]", "meta-truncations:K=1"}
    for name in ("dm-paper", "rnnprop-paper"):
        reference = meta[f"meta:{name}:K=2[reference]"]  # (the quick report compiles nothing: compiling is slow)
        assert meta[f"meta:{name}:K=2"]["fused"] and not reference["fused"] and not reference["compile"]
    assert meta["meta:K=2"]["fused"] and not meta["meta:K=2[reference]"]["fused"]
    assert meta["meta:K=2"]["peak_over_task_bytes"] == (meta["meta:K=2"]["peak_memory_bytes"]
                                                        - meta["meta:K=2"]["task_memory_bytes"])
    for k in (1, 2):
        row = meta[f"meta:K={k}"]
        assert row["inner_steps_per_s"] == pytest.approx(k * row["truncation"] / row["time_s"]["median_s"])
    truncations = meta["meta-truncations:K=1"]
    assert len(truncations["peak_memory_bytes"]) == truncations["truncations"] == 3
    assert truncations["last_over_first"] == truncations["last_peak_bytes"] / truncations["first_peak_bytes"]
    (table1,) = quick_report["sections"]["table1"]["rows"]
    assert table1["key"] == "table1:2-seeds" and table1["steps"] == 5 and "hyperadam" in table1["optimizers"]


def test_every_number_in_the_report_is_finite_and_positive(quick_report):
    numbers = list(_numbers(quick_report))
    assert len(numbers) > 100
    for path, value in numbers:
        assert math.isfinite(value), path
        if bench.NONNEGATIVE_FIELDS.intersection(p for p in path if isinstance(p, str)):
            assert value >= 0, path
        else:
            assert value > 0, path


def test_learned_variant_rows_record_their_check_against_the_reference(quick_report):
    for section, learner in (("step", "mlp-9x20"), ("iteration", "mlp-9x20")):
        rows = {r["key"]: r for r in quick_report["sections"][section]["rows"]}
        for name in bench.FRESH_LEARNED:
            reference, flat = rows[f"{section}:{name}[reference]:{learner}"], rows[f"{section}:{name}[flat]:{learner}"]
            assert reference["variant"] == "reference" and "check" not in reference  # it is the reference
            assert flat["variant"] == "flat" and flat["family"] == reference["family"] == f"{section}:{name}:{learner}"
            # the eager flat path is the reference bit for bit on the CPU
            assert flat["check"] == {"steps": 3, "max_abs_diff_params": 0.0, "max_abs_diff_state": 0.0,
                                     "max_rel_diff": 0.0, "rtol": bench.VARIANT_RTOL}


def _variant_pair(lr):
    torch.manual_seed(0)
    lopt, model = HyperAdam(num_candidates=3), torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    reference_model = copy.deepcopy(model)
    return (lopt.frozen(model.parameters(), lr=lr), model, lopt.frozen(reference_model.parameters(), lr=0.01,
                                                                        fast=False), reference_model)


def test_variant_check_measures_differences_and_stops_a_wrong_fast_path():
    check = bench.compare_with_reference(*_variant_pair(0.01), torch.Generator().manual_seed(0), "hyperadam[flat]")
    assert check["max_rel_diff"] == check["max_abs_diff_params"] == check["max_abs_diff_state"] == 0.0
    # a variant 2 % off (here: another lr) moves the parameters 2 % differently: stopped, naming the tensor
    opt, model, reference, reference_model = _variant_pair(0.0102)
    with pytest.raises(bench.VariantMismatchError, match=r"hyperadam\[bad\]: after 3 steps the parameter \d differs "
                                                         r"from the reference path by 0.02 of its scale"):
        bench.compare_with_reference(opt, model, reference, reference_model, torch.Generator().manual_seed(0),
                                     "hyperadam[bad]")
    # within the tolerance it passes and reports the difference
    opt, model, reference, reference_model = _variant_pair(0.01 * (1 + 1e-5))
    check = bench.compare_with_reference(opt, model, reference, reference_model, torch.Generator().manual_seed(0),
                                         "hyperadam[close]")
    assert 0 < check["max_abs_diff_params"] and 0.5e-5 < check["max_rel_diff"] < 2e-5


def test_roofline_is_bytes_over_bandwidth(quick_report):
    row = next(r for r in quick_report["sections"]["step"]["rows"] if r["key"] == "step:hyperadam[flat]:mlp-9x20")
    bandwidth = quick_report["bandwidth"]
    assert bandwidth["bytes_moved"] == 2 * bandwidth["buffer_bytes"]  # a copy reads and writes every byte
    assert bandwidth["bytes_per_s"] == pytest.approx(bandwidth["bytes_moved"] / bandwidth["time_s"]["median_s"])
    model = row["byte_model"]
    assert (model["state_floats"], model["reduction_floats"]) == (120, 21)
    assert row["bytes_per_step"] == (3 + 2 * 120 + 21) * row["num_params"] * 4
    assert row["roofline_s"] == pytest.approx(row["bytes_per_step"] / bandwidth["bytes_per_s"], rel=1e-12)
    assert row["ratio_to_roofline"] == pytest.approx(row["time_s"]["median_s"] / row["roofline_s"], rel=1e-12)
    assert row["stored_state_floats"] == 120  # the frozen face holds exactly the modelled state


# -- Markdown -------------------------------------------------------------------------------------------------------


def _hand_made_report():
    report = {
        "environment": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.14.1",
                        "date": "2026-11-22", "git_commit": "0123456789abcdef", "git_dirty": False},
        "bandwidth": {"bytes_per_s": 3.0e12},
        "sections": {
            "step": {"rows": [
                {"key": "step:hyperadam[reference]:resnet18", "optimizer": "hyperadam[reference]",
                 "learner": "resnet18", "family": "step:hyperadam:resnet18", "variant": "reference",
                 "includes_closure": False, "time_s": {"median_s": 0.059}, "roofline_s": 0.0118,
                 "ratio_to_roofline": 5.0},
                {"key": "step:hyperadam[compiled]:resnet18", "optimizer": "hyperadam[compiled]",
                 "learner": "resnet18", "family": "step:hyperadam:resnet18", "variant": "compiled",
                 "includes_closure": False, "time_s": {"median_s": 0.0177}, "roofline_s": 0.0118,
                 "ratio_to_roofline": 1.5, "check": {"max_rel_diff": 3.1e-7}},
                {"key": "step:marthe:resnet18", "optimizer": "marthe", "learner": "resnet18", "includes_closure": True,
                 "time_s": {"median_s": 0.1}},
                {"key": "step:dm:resnet18", "error": "out of memory: CUDA out of memory"}]},
            "iteration": {"rows": [
                {"key": "iteration:sgd-hd:resnet18", "optimizer": "sgd-hd", "model": "resnet18",
                 "time_s": {"median_s": 0.0302}, "ratio_to_adam": 0.98, "ratio_to_base": 1.02, "base": "sgd"}]},
            "meta": {"rows": [
                {"key": "meta:K=1", "meta_batch": 1, "inner_steps_per_s": 76.0, "peak_memory_bytes": 2.5e9},
                {"key": "meta-truncations:K=8", "meta_batch": 8, "truncations": 10, "first_peak_bytes": 4e9,
                 "last_peak_bytes": 4e9, "last_over_first": 1.0}]},
            "table1": {"skipped": "fashion-mnist not found\nlooked in: /nowhere", "rows": []},
        },
        "anchors": bench.ANCHORS,
    }
    report["targets"] = bench.judge_targets(report)
    return report


def test_markdown_of_a_hand_made_report():
    report = _hand_made_report()
    judged = {(t["key"], t["metric"]): t for t in report["targets"]}
    best = judged[("step:hyperadam:resnet18", "ratio_to_roofline")]  # the best variant: 1.5× <= 2× (reference 5×)
    assert best["passed"] is True and best["measured"] == 1.5 and best["variant"] == "compiled"
    assert judged[("iteration:sgd-hd:resnet18", "ratio_to_base")]["passed"] is True  # 1.02× <= 1.05×
    assert judged[("step:hyperadam:mlp-9x20", "time_s.median_s")]["measured"] is None
    lines = bench.markdown_report(report).splitlines()
    assert lines[0] == ("Measured on NVIDIA H100 80GB HBM3 (cuda), torch 2.14.1, 2026-11-22, commit 0123456789ab.")
    assert lines[1] == "Copy bandwidth (read + write): 3,000 GB/s."
    assert "| measurement | measured | roofline | ratio | target | anchor |" in lines
    assert ("| hyperadam[reference] step on resnet18 | 59 ms | 11.8 ms | 5× | – | 59 ms (eager HyperAdam) |"
            in lines)
    assert ("| hyperadam[compiled] step on resnet18 (Δ vs reference 3.1e-07) | 17.7 ms | 11.8 ms | 1.5× | "
            "≤ 2× roofline: pass | – |") in lines
    assert "| marthe step on resnet18 (with closure) | 100 ms | – | – | – | – |" in lines
    assert "| step:dm:resnet18 | out of memory: CUDA out of memory | – | – | ≤ 2× roofline | – |" in lines
    assert "| sgd-hd on resnet18 | 30.2 ms | – | 0.98× Adam; 1.02× sgd | ≤ 1.05× base: pass | – |" in lines
    assert ("| hyperadam-paper, K = 1 tasks | 76 inner steps/s, peak 2.5 GB | – | – | – | "
            "76 inner steps/s (meta-training, 1 task) |") in lines
    assert "| peak memory, truncation 1 vs 10 (K = 8) | 4 GB → 4 GB | – | 1× (last / first) | – | – |" in lines
    assert "Skipped: fashion-mnist not found" in lines


def test_render_prints_the_table_of_a_saved_report(tmp_path, capsys):
    report = _hand_made_report()
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    assert bench.main(["--render", str(path)]) == 0
    assert capsys.readouterr().out == bench.markdown_report(report)


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--quick", "--device", "--out", "--only", "--repeats", "--warmup", "--markdown", "--render",
                 "--table1-seeds", "--table1-repeats", "--threads", "--seed", "--variants"):
        assert flag in text


def test_a_failing_fast_variant_is_recorded_and_the_run_goes_on():
    def broken():
        raise RuntimeError("triton: compilation failed\nlong log")

    device = torch.device("cpu")
    row = bench._guard({"key": "step:hyperadam[triton]:mlp-9x20", "variant": "triton"}, device, broken)
    assert row["error"] == "RuntimeError: triton: compilation failed"
    with pytest.raises(RuntimeError, match="compilation failed"):  # the reference and non-learned rows still fail
        bench._guard({"key": "step:hyperadam[reference]:mlp-9x20", "variant": "reference"}, device, broken)
    with pytest.raises(RuntimeError, match="compilation failed"):
        bench._guard({"key": "step:adam:mlp-9x20"}, device, broken)

    def mismatch():
        raise bench.VariantMismatchError("hyperadam[triton]: differs")

    with pytest.raises(bench.VariantMismatchError):  # a wrong fast path always stops the run
        bench._guard({"key": "step:hyperadam[triton]:mlp-9x20", "variant": "triton"}, device, mismatch)


def test_readme_shows_the_committed_cpu_faces_report():
    """The README's CPU step table is the committed report rendered (python -m metaopt.bench --render FILE), and
    that report is a full faces run (judged, both learners, every registered optimizer) on a CPU."""
    import re

    readme = (bench.REPO_ROOT / "README.md").read_text()
    match = re.search(r"<!-- bench:faces (\S+) -->\n(.*?)<!-- bench:faces end -->", readme, re.S)
    assert match, "README.md lacks the <!-- bench:faces FILE --> block"
    report = json.loads((bench.REPO_ROOT / match.group(1)).read_text())
    assert match.group(2) == bench.markdown_report(report)
    assert report["environment"]["device"] == "cpu" and not report["settings"]["quick"]
    rows = report["sections"]["faces"]["rows"]
    assert {r["optimizer"] for r in rows} >= set(metaopt.OPTIMIZERS)
    assert {r["learner"] for r in rows} == {"mlp-784-20-10", "mlp-784-256x3-10"}
    assert all(r["passed"] in (True, False) for r in rows if "target" in r)


def test_traffic_bound_is_the_ratio_of_the_memory_models_where_the_baseline_moves_its_minimum():
    """SGD-HD must move p, g, d_prev (read) and p, d_prev (written): 7 floats per coordinate against torch SGD's 3,
    so no SGD-HD step can reach 1.3x a memory-bound torch SGD step; against torch's momentum SGD or Adam (whose
    foreach steps move more than their models) no bound is claimed."""
    from metaopt.bench.faces import traffic_bound

    assert traffic_bound("sgd-hd") == pytest.approx(7 / 3) and traffic_bound("sgd-hd[compiled]") == traffic_bound("sgd-hd")
    assert traffic_bound("sgd") == 1.0
    assert traffic_bound("adam-hd") is None and traffic_bound("sgdn-hd") is None and traffic_bound("marthe") is None
    assert traffic_bound("hyperadam") is None
