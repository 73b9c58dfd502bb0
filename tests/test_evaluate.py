"""The evaluation harness: identical starts and data for every optimizer, determinism, and its outputs."""

import json

import pytest

import meta_tasks
from meta_tasks import datasets
from metaopt import evaluate

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
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["suite"] == "hyperadam-table1" and results["meta"]["device"] == "cpu"
    assert len(results["runs"]) == 4 * 2 * 2
    assert all(len(r["losses"]) == 3 and 0 <= r["test"]["top1"] <= 1 for r in results["runs"])
    assert (tmp_path / "table.md").read_text().strip() == printed.strip()


def test_cli_rejects_unknown_optimizer():
    with pytest.raises(SystemExit, match="Valid names"):
        evaluate.main(["--optimizers", "adamw-typo", "--seeds", "1", "--steps", "1"])
