"""metaopt.evaluate.aggregate: the two scores against hand-computed values, rliable's IQM against a direct trimmed
mean, the stratified intervals' behaviour on known inputs, the files per suite and across suites, and the README
rendering of both."""

import json

import numpy as np
import pytest
import scipy.stats

from metaopt.evaluate import aggregate, report
from metaopt.evaluate import results as rs
from metaopt.evaluate.runner import Run
from metaopt.evaluate.suites import PARAMETER_FREE

pytest.importorskip("rliable")


def curve(start, end, steps=20):
    return list(np.linspace(start, end, steps))


def runs_for(curves):
    """``curves[(label, task)]`` = one loss curve per seed."""
    return [Run(label, task, seed, list(c), 1e-3, {}) for (label, task), cs in curves.items()
            for seed, c in enumerate(cs)]


def test_trailing_mean_and_speedup_by_hand():
    x = [4.0, 2.0, 6.0, 0.0, 1.0]
    assert list(aggregate.trailing_mean(x, 2)) == [4.0, 3.0, 4.0, 3.0, 0.5]
    assert list(aggregate.trailing_mean(x, 1)) == x
    # steps 1..5 with trailing means 4, 3, 4, 3, 0.5: first <= 3 at step 2 -> 5 / 2
    assert aggregate.speedup(x, 3.0, 2) == 2.5
    assert aggregate.speedup(x, 0.1, 2) == 0.0                      # never reached
    assert aggregate.speedup([float("nan")] * 5, 3.0, 2) == 0.0      # diverged
    assert aggregate.window(100) == 10 and aggregate.window(5) == 1


def test_scores_normalize_by_adam_per_task_and_pair_speedups_by_seed():
    curves = {("adam", "a"): [curve(3, 1), curve(3, 1.2)], ("adam", "b"): [curve(30, 10), curve(30, 14)],
              ("half", "a"): [curve(3, 0.55), curve(3, 0.55)], ("half", "b"): [curve(30, 6), curve(30, 6)],
              ("partial", "a"): [curve(3, 1), curve(3, 1)]}  # no task b: left out
    table, seeds = aggregate.scores(runs_for(curves), ["a", "b"])
    assert seeds == [0, 1] and set(table["normalized_loss"]) == {"adam", "half"}
    np.testing.assert_allclose(table["normalized_loss"]["half"], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(table["normalized_loss"]["adam"], [[1 / 1.1, 10 / 12], [1.2 / 1.1, 14 / 12]])
    # speedup by hand for "half" on task a, seed 0: Adam's trailing mean (window 2) at step 20 is the mean of its
    # last two losses; "half" reaches it at the first step whose own trailing mean is at or below it
    adam = curve(3, 1)
    target = (adam[-1] + adam[-2]) / 2
    mine = aggregate.trailing_mean(curve(3, 0.55), 2)
    t = int(np.flatnonzero(mine <= target)[0]) + 1
    assert table["speedup"]["half"][0, 0] == pytest.approx(20 / t) and 20 / t > 1
    assert table["speedup"]["adam"][0, 0] == pytest.approx(1.0)   # Adam reaches its own final mean at its end


def test_scores_explain_a_missing_baseline():
    with pytest.raises(ValueError, match="no 'adam' runs.*--optimizers"):
        aggregate.scores(runs_for({("sgd", "a"): [curve(3, 1)]}), ["a"])


def test_iqm_is_the_trimmed_mean_and_intervals_bracket_it():
    rng = np.random.default_rng(0)
    values = rng.lognormal(size=(12, 3))
    result = aggregate.interval_estimates({"x": values, "constant": np.full((12, 3), 0.7)})
    assert result["x"]["iqm"] == pytest.approx(scipy.stats.trim_mean(values.ravel(), 0.25))
    assert result["x"]["low"] < result["x"]["iqm"] < result["x"]["high"]
    assert result["constant"] == {"iqm": pytest.approx(0.7), "low": pytest.approx(0.7), "high": pytest.approx(0.7)}
    # seeded: the same interval twice
    assert aggregate.interval_estimates({"x": values}) == {"x": result["x"]}


def test_iqm_equals_rliables_bit_for_bit():
    from rliable import metrics

    rng = np.random.default_rng(1)
    for shape in ((1, 1), (3, 1), (5, 4), (12, 3), (7, 13), (100, 4)):
        values = rng.lognormal(size=shape)
        values[rng.random(shape) < 0.1] = np.inf  # diverged runs
        (ours,) = aggregate.iqm(values)
        theirs = metrics.aggregate_iqm(values)
        assert ours == theirs or (np.isinf(ours) and np.isinf(theirs)), shape
    assert np.isnan(aggregate.iqm(np.array([[1.0, np.nan, 2.0, 3.0]]))[0])
    assert np.isnan(metrics.aggregate_iqm(np.array([[1.0, np.nan, 2.0, 3.0]])))


def results_payload(suite, curves, seeds, date="2026-01-01"):
    runs = runs_for(curves)
    tasks = list(dict.fromkeys(t for _, t in curves))
    meta = {"suite": suite, "steps": 20, "seeds": list(range(seeds)), "device": "cpu", "device_name": "test-cpu",
            "torch": "2.x", "metaopt": "0.1.0", "dataset": "fashion-mnist", "tasks": {t: {"name": t} for t in tasks},
            "optimizers": {}, "reference": "adam", "references": {}, "compare": "train_loss", "tuned_on_seeds": [],
            "quick": False, "eval_size": None, "date": date, "command": ["python", "-m", "metaopt.evaluate"]}
    return {"meta": meta, "runs": report.runs_to_json(runs), "significance": [], "tuned": {}, "sweep": [],
            "lrs_opt": [], "skipped": {}}


def write(directory, payload):
    directory.mkdir(parents=True)
    (directory / report.RESULTS_FILE).write_text(json.dumps(payload))
    return directory


def test_files_per_suite_and_across_suites_and_their_readme_sections(tmp_path):
    others = {label: [curve(3, 1.5)] * 4 for label in PARAMETER_FREE if label not in ("prodigy", "dog")}
    one = write(tmp_path / "one", results_payload("hyperadam-table1", {
        ("adam", "mlp-sigmoid"): [curve(3, 1)] * 4, ("prodigy", "mlp-sigmoid"): [curve(3, 0.5)] * 4,
        ("dog", "mlp-sigmoid"): [curve(3, 2)] * 4, ("hyperadam", "mlp-sigmoid"): [curve(3, 0.9)] * 4,
        **{(label, "mlp-sigmoid"): c for label, c in others.items()}}, 4))
    two = write(tmp_path / "two", results_payload("hypergrad-lenet", {
        ("adam", "lenet5-5k"): [curve(3, 1)] * 3, ("prodigy", "lenet5-5k"): [curve(3, 2)] * 3,
        ("dog", "lenet5-5k"): [curve(3, 2)] * 3, **{(label, "lenet5-5k"): c[:3] for label, c in others.items()}}, 3))
    older = write(tmp_path / "older", results_payload("hypergrad-lenet", {
        ("adam", "lenet5-5k"): [curve(3, 1)] * 3, ("prodigy", "lenet5-5k"): [curve(3, 9)] * 3,
        ("dog", "lenet5-5k"): [curve(3, 2)] * 3, **{(label, "lenet5-5k"): c[:3] for label, c in others.items()}}, 3,
        "2025-01-01"))
    no_pf = write(tmp_path / "no-pf", results_payload("learned-rules", {
        ("adam", "mlp-elu"): [curve(3, 1)] * 3, ("sgd", "mlp-elu"): [curve(3, 2)] * 3}, 3, "2027-01-01"))
    none = write(tmp_path / "none", results_payload("hypergrad-lenet", {("sgd", "lenet5-5k"): [curve(3, 1)]}, 1))
    for d in (one, two, older, no_pf, none):
        payload = json.loads((d / report.RESULTS_FILE).read_text())
        payload["meta"]["optimizers"] = {r["optimizer"]: {} for r in payload["runs"]}
        (d / report.RESULTS_FILE).write_text(json.dumps(payload))
    written = rs.write_aggregates(tmp_path)
    assert set(written) == {one, two, older, no_pf, tmp_path / aggregate.SUMMARY_DIR}
    assert not (none / aggregate.AGGREGATE_FILE).exists()
    for d in written:
        assert (d / aggregate.AGGREGATE_PLOT).stat().st_size > 1000
    first = aggregate.load(one)
    assert first["normalized_loss"]["prodigy"]["iqm"] == pytest.approx(0.5)
    assert first["speedup"]["dog"]["iqm"] == 0.0
    summary = aggregate.load(tmp_path / aggregate.SUMMARY_DIR)
    # the newest lenet set with the parameter-free baselines; not the set without them; the labels in all (not
    # hyperadam); three seeds of each (the smaller count)
    assert summary["directories"] == ["one", "two"] and summary["seeds"] == [0, 1, 2]
    assert set(summary["normalized_loss"]) == {"adam", *PARAMETER_FREE}
    assert summary["tasks"] == ["one/mlp-sigmoid", "two/lenet5-5k"]
    # prodigy: 0.5 on one task and 2.0 on the other, three seeds each: the IQM of six values, three of each
    assert summary["normalized_loss"]["prodigy"]["iqm"] == pytest.approx(scipy.stats.trim_mean([0.5] * 3 + [2] * 3,
                                                                                               0.25))
    text = rs.render_results(tmp_path, relative_to=tmp_path)
    sections = text.split("\n\n### ")
    assert sections[0].startswith("### The papers' claims") and sections[1].startswith("Across suites")
    assert "| prodigy | 0.500 [0.500, 0.500] |" in text
    assert "![hyperadam-table1: aggregate](one/aggregate.png)" in text


def test_infinite_losses_survive_the_file(tmp_path):
    d = write(tmp_path / "d", results_payload("hyperadam-table1", {
        ("adam", "mlp-sigmoid"): [curve(3, 1)] * 4, ("sgd", "mlp-sigmoid"): [[3.0] * 19 + [float("inf")]] * 4}, 4))
    aggregate.write_suite(d)
    assert aggregate.load(d)["normalized_loss"]["sgd"] == {"iqm": float("inf"), "low": float("inf"),
                                                          "high": float("inf")}
