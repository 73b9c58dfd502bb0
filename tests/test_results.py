"""The README's Results section: rendered from results directories written by run_suite, with the HyperAdam paper's
numbers beside ours, verdicts computed from per-seed values, and the README block kept equal to the committed files."""

import dataclasses
import json
import shlex
import statistics
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from metaopt.evaluate import SUITES, Run, TaskSpec, report, run_suite
from metaopt.evaluate import results as rs
from metaopt.learned import HyperAdam

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT.parent / "shared" / "papers" / "hyperadam.txt"


def quadratic_table2():
    """hyperadam-table2 with each LSTM task replaced by a small quadratic under the same label: the real pipeline
    (tuning, runs, significance, files) in seconds."""
    suite = SUITES["hyperadam-table2"]
    tasks = tuple(TaskSpec(spec.label, "quadratic", {"dim": 4, "seed": i}) for i, spec in enumerate(suite.task_specs))
    return dataclasses.replace(suite, tasks=tasks)


@pytest.fixture(scope="module")
def table2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "table2-quick"
    run_suite(quadratic_table2(), quick=True, seeds=2, steps=3, sources={"hyperadam": HyperAdam(num_candidates=2)},
              tune_seeds=1, out=out, progress=False,
              command=["python", "-m", "metaopt.evaluate", "--suite", "hyperadam-table2", "--quick", "--seeds", "2"])
    return out


def table_rows(text):
    """Markdown table rows of ``text``'s first table (the suite's; the aggregate's follows), keyed by first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] in rows:  # a second table starts
                break
            rows[cells[0]] = cells[1:]
    return rows


def test_render_of_a_results_dir_written_by_run_suite(table2_dir):
    results = json.loads((table2_dir / "results.json").read_text())
    meta = results["meta"]
    text = rs.render_results(table2_dir.parent, relative_to=table2_dir.parent)

    device = meta["device_name"] if meta["device_name"] == meta["device"] else \
        f"{meta['device_name']} ({meta['device']})"
    assert f"### hyperadam-table2 — {device}, {meta['date']}" in text
    assert "2 seeds (0, 1) × 3 steps" in text
    assert "Command: `python -m metaopt.evaluate --suite hyperadam-table2 --quick --seeds 2`" in text
    assert "![hyperadam-table2: curves](table2-quick/curves.png)" in text and (table2_dir / "curves.png").is_file()

    rows = table_rows(text)
    tasks = list(meta["tasks"])
    assert tasks == ["lstm-sine", "lstm-sine-small-noise", "lstm-sine-2layer"]
    p_values = {(s["task"], s["optimizer"]): s["p"] for s in results["significance"]}
    for label in ("hyperadam", "adam"):
        for j, task in enumerate(tasks):
            finals = [r.losses[-1] for r in report.runs_from_json(results["runs"])
                      if r.optimizer == label and r.task == task]
            expected = f"{statistics.mean(finals):.4f} ± {statistics.stdev(finals) / 2 ** 0.5:.4f}"
            if label == "adam":
                expected += f" (p = {p_values[(task, 'adam')]:.2g})"
            assert rows[label][j] == expected
    # the paper's Table 2 beside ours; the sines are generated in both, so no dataset caveat
    assert rows["hyperadam, paper"] == ["0.42", "0.19", "0.26"]
    assert rows["adam, paper"] == ["0.65", "0.39", "0.51"]
    assert rows["dm, paper"] == ["3.10", "3.06", "2.05"] and rows["rnnprop, paper"] == ["0.49", "0.32", "0.27"]
    assert "Dataset difference" not in text
    # two seeds cannot reach p < 0.05 (the smallest two-sided exact p is 0.5): no win can be counted
    assert "HyperAdam below tuned Adam at p < 0.05 on 0 of 3 LSTM tasks (target: all) — not met." in text


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic results: known outcomes


def synthetic(suite_name, finals, *, dataset="fashion-mnist", tuned=(), skipped=None):
    """A results.json payload of ``suite_name`` whose runs end at ``finals[(task, label)]`` (one value per seed)."""
    suite = SUITES[suite_name]
    runs = [Run(label, task, seed, [3.0, value], 1e-3, {}) for (task, label), values in finals.items()
            for seed, value in enumerate(values)]
    labels = list(dict.fromkeys(label for _, label in finals))
    tasks = list(dict.fromkeys(task for task, _ in finals))
    references = {label: suite.references.get(label, suite.reference) for label in labels}
    n = len(next(iter(finals.values())))
    meta = {"suite": suite_name, "steps": 100, "seeds": list(range(n)), "device": "cpu", "device_name": "test-cpu",
            "torch": "2.x", "metaopt": "0.1.0", "dataset": dataset, "tasks": {t: {"name": t} for t in tasks},
            "optimizers": {label: {} for label in labels}, "reference": suite.reference, "references": references,
            "compare": suite.compare, "tuned_on_seeds": [10000] if tuned else [], "quick": False, "eval_size": None,
            "date": "2026-01-01", "command": ["python", "-m", "metaopt.evaluate", "--suite", suite_name]}
    return {"meta": meta, "runs": report.runs_to_json(runs),
            "significance": report.significance(runs, references.get, suite.compare),
            "tuned": {t: {label: {"lr": 0.01, "grid": [0.01], "objective": [1.0]} for label in tuned} for t in tasks}
            if tuned else {},
            "sweep": [], "lrs_opt": [], "skipped": skipped or {}}


def write(directory, payload):
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(payload))
    return directory


BASE = [0.50, 0.61, 0.47, 0.58, 0.52, 0.66]
WIN = [b - 0.01 * (i + 1) for i, b in enumerate(BASE)]    # lower on every seed, distinct differences
LOSS = [b + 0.01 * (i + 1) for i, b in enumerate(BASE)]   # higher on every seed
MIXED = [b + d for b, d in zip(BASE, (0.03, -0.01, 0.02, -0.02, 0.01, 0.005))]  # worse mean, not significant
P_SIX = scipy.stats.wilcoxon(WIN, BASE).pvalue             # 2 / 2^6: every difference of one sign


def table1(sigmoid, relu, elu, tanh, **kw):
    finals = {}
    for task, ours in zip(("mlp-sigmoid", "mlp-relu", "mlp-elu", "mlp-tanh"), (sigmoid, relu, elu, tanh)):
        finals[(task, "hyperadam")], finals[(task, "adam")] = ours, BASE
    return synthetic("hyperadam-table1", finals, **kw)


def test_beat_verdict_counts_significant_wins_only():
    assert P_SIX == pytest.approx(2 / 64) and scipy.stats.wilcoxon(MIXED, BASE).pvalue >= 0.05
    target = rs.BEAT_TARGETS["hyperadam-table1"][0]
    line = rs.beat_verdict(table1(WIN, LOSS, BASE, MIXED, tuned=("adam",)), target)
    assert line.startswith("**Target**: HyperAdam below tuned Adam at p < 0.05 on 1 of 4 activations (target: 3) — "
                           "not met. ")
    assert f"mlp-sigmoid: yes ({statistics.mean(WIN):.4f} vs {statistics.mean(BASE):.4f}, p = {P_SIX:.2g})" in line
    assert f"mlp-relu: no ({statistics.mean(LOSS):.4f} vs {statistics.mean(BASE):.4f}, p = {P_SIX:.2g})" in line
    assert f"mlp-elu: no ({statistics.mean(BASE):.4f} vs {statistics.mean(BASE):.4f}, p = 1)" in line  # a tie
    assert "mlp-tanh: no" in line
    met = rs.beat_verdict(table1(WIN, WIN, WIN, LOSS), target)
    assert "on 3 of 4 activations (target: 3) — met." in met
    assert "below Adam (learning rate not tuned)" in met


def test_beat_verdict_says_when_an_optimizer_was_not_run():
    payload = synthetic("hyperadam-table2", {("lstm-sine", "adam"): BASE}, skipped={"hyperadam": "no checkpoint"})
    line = rs.beat_verdict(payload, rs.BEAT_TARGETS["hyperadam-table2"][0])
    assert line.endswith("(target: all): not evaluated (no runs of hyperadam (no checkpoint)).")


def test_health_verdict_counts_stuck_and_diverged_runs_of_the_shipped_hyperadams():
    # every synthetic run starts at 3.0: 2.98 is within 1 % of it (stuck), 3.5 ended above it, nan diverged
    finals = {("mlp-sigmoid", "hyperadam"): [0.5, 2.98, 0.4], ("mlp-relu", "hyperadam"): [float("nan"), 3.5, 0.4],
              ("mlp-sigmoid", "adam"): [3.0, 3.0, 3.0], ("mlp-relu", "adam"): [0.5, 0.5, 0.5]}
    lines = [line for line in rs.verdicts(synthetic("hyperadam-table1", finals)) if "stuck" in line]
    assert lines == ["**Target**: no seed of hyperadam stuck at its initial loss (final training loss ≥ 0.99 × the "
                     "first step's) or diverged (a non-finite loss) — not met: 3 of 6 runs (mlp-sigmoid: 1 stuck; "
                     "mlp-relu: 1 diverged, 1 stuck)."]  # Adam's stuck seeds are not this target's
    finals[("mlp-sigmoid", "hyperadam-general")] = [0.5, 0.6, 2.96]
    lines = [line for line in rs.verdicts(synthetic("hyperadam-table1", finals)) if "stuck" in line]
    assert len(lines) == 2 and lines[1].startswith("**Target**: no seed of hyperadam-general stuck") and \
        lines[1].endswith("— met (none of 3 runs).")
    assert [line for line in rs.verdicts(synthetic("learned-heldout", finals)) if "stuck" in line] == []


def test_match_verdict_accepts_wins_and_ties_and_rejects_losses_and_divergence():
    tasks = ("mlp-elu", "mlp-tanh", "cnn-2", "lenet5")
    finals = {}
    gamma = dict(zip(tasks, (WIN, BASE, LOSS, MIXED)))       # win, tie, significant loss, insignificant loss
    mu = dict(zip(tasks, (BASE, BASE, BASE, BASE[:-1] + [float("nan")])))  # ties, then one diverged seed
    for task in tasks:
        finals.update({(task, "cam-hd-learned-gamma"): gamma[task], (task, "cam-hd-adam"): BASE,
                       (task, "marthe-learned-mu"): mu[task], (task, "marthe"): BASE})
    lines = rs.verdicts(synthetic("learned-rules", finals))
    assert len(lines) == 2
    assert lines[0].startswith("**Target**: cam-hd-learned-gamma at least matches cam-hd-adam on 3 of 4 tasks "
                               "(target: all; at least matches = mean final training loss not worse (lower is better) "
                               "or Wilcoxon p ≥ 0.05 over the seeds both ended finite, and no seed diverged where "
                               "the baseline did not) — not met.")
    assert [f"{t}: yes" in lines[0] for t in tasks] == [True, True, False, True]
    assert lines[1].startswith("**Target**: marthe-learned-mu at least matches marthe on 3 of 4 tasks")
    assert "lenet5: no" in lines[1] and "cnn-2: yes" in lines[1]
    both = dict(finals)
    both[("lenet5", "marthe")] = BASE[:-1] + [float("inf")]  # the baseline diverged on that seed too: not worse
    assert "lenet5: yes" in rs.verdicts(synthetic("learned-rules", both))[1]
    table = table_rows(rs.results_table(synthetic("learned-rules", finals)))
    assert table["marthe (p vs marthe-learned-mu)"][0] == f"{statistics.mean(BASE):.4f} ± " \
        f"{statistics.stdev(BASE) / 6 ** 0.5:.4f} (p = 1)"
    assert table["cam-hd-adam"][2].endswith(f"(p = {P_SIX:.2g})")  # against the suite's reference, unnamed
    everything = {k: (BASE if k[0] == "lenet5" and k[1] == "marthe-learned-mu" else v) for k, v in finals.items()}
    assert "on 4 of 4 tasks" in rs.verdicts(synthetic("learned-rules", everything))[1]


def test_paired_comparison_follows_the_metric_direction():
    runs = rs.load_runs(synthetic("hypergrad-lenet", {("lenet5-5k", "sgd-hd"): [0.9, 0.8, 0.7],
                                                      ("lenet5-5k", "cam-hd-sgd"): [0.85, 0.75, 0.65]}))
    for r in runs:  # test_top1 is the compare metric here: higher is better
        r.test = {"top1": r.losses[-1]}
    c = rs.paired(runs, "lenet5-5k", "sgd-hd", "cam-hd-sgd", "test_top1")
    assert c.better and c.at_least_matches and c.mean == pytest.approx(0.8)
    assert not rs.paired(runs, "lenet5-5k", "cam-hd-sgd", "sgd-hd", "test_top1").better


def test_paper_rows_and_the_dataset_difference_for_table1(tmp_path):
    payload = table1(WIN, LOSS, BASE, MIXED, tuned=("adam",), skipped={"dm": "no checkpoint in checkpoints/dm"})
    text = rs.render_results(write(tmp_path / "fmnist" / "t1", payload).parent, relative_to=tmp_path)
    rows = table_rows(text)
    assert rows["hyperadam, paper (MNIST)"] == ["0.33", "0.29", "0.28", "0.36"]
    assert rows["adam, paper (MNIST)"] == ["0.35", "0.32", "0.31", "0.34"]
    assert rows["dm, paper (MNIST)"] == ["0.38", "1.42", "2.02", "0.83"]
    assert rows["rnnprop, paper (MNIST)"] == ["0.34", "0.31", "0.31", "0.33"]
    assert "**Dataset difference**: these runs used Fashion-MNIST, the paper MNIST" in text
    assert "Not run: dm (no checkpoint in checkpoints/dm)." in text
    assert "files: [`fmnist/t1/`](fmnist/t1/)" in text
    mnist = table1(WIN, LOSS, BASE, MIXED, dataset="mnist")
    assert "Dataset difference" not in rs.render_results(write(tmp_path / "mnist" / "t1", mnist).parent)


@pytest.mark.skipif(not PAPER.is_file(), reason="the papers are not checked out beside the repository")
def test_paper_constants_are_the_papers_tables():
    lines = PAPER.read_text().splitlines()
    columns = ("adam", "dm", "rnnprop", "hyperadam")  # "Adam DMoptimizer RNNprop HyperAdam"
    for name, first, tasks in (("hyperadam-table1", 250, ("mlp-sigmoid", "mlp-relu", "mlp-elu", "mlp-tanh")),
                               ("hyperadam-table2", 277, ("lstm-sine", "lstm-sine-small-noise",
                                                          "lstm-sine-2layer"))):
        assert tuple(t.label for t in SUITES[name].task_specs) == tasks
        for i, task in enumerate(tasks):
            values = [float(v) for v in lines[first - 1 + i].split("\t")[-4:]]
            assert [rs.PAPER_TABLES[name].values[c][task] for c in columns] == values


def test_results_are_ordered_by_suite_then_name(tmp_path):
    t2 = synthetic("hyperadam-table2", {("lstm-sine", "adam"): BASE})
    t1 = table1(BASE, BASE, BASE, BASE)
    for name, payload in (("a", t2), ("z", t1), ("b", t1)):
        write(tmp_path / name, payload)
    assert [d.name for d in rs.result_dirs(tmp_path)] == ["b", "z", "a"]
    assert rs.render_results(tmp_path / "none", relative_to=tmp_path) == (
        "No evaluation results are committed yet: `none/` holds no directory with a results.json.")


# ----------------------------------------------------------------------------------------------------------------------
# The README block


def test_write_then_check_round_trip(tmp_path, capsys):
    root = write(tmp_path / "results" / "t1", table1(WIN, LOSS, BASE, MIXED)).parent
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n## Results\n\n{rs.BEGIN}\nstale\n{rs.END}\n\n## After\n")
    assert rs.main(["--root", str(root), "--write", str(readme)]) == 0
    text = readme.read_text()
    block = rs.render_results(root, relative_to=tmp_path)
    assert text == f"# title\n\n## Results\n\n{rs.BEGIN}\n{block}\n{rs.END}\n\n## After\n"
    assert "files: [`results/t1/`](results/t1/)" in block
    assert rs.main(["--root", str(root), "--check", str(readme)]) == 0
    shown = f"{statistics.mean(BASE):.4f}"  # adam's mean, in the table
    readme.write_text(text.replace(shown, "9.9999", 1))
    capsys.readouterr()
    assert rs.main(["--root", str(root), "--check", str(readme)]) == 1
    diff = capsys.readouterr().out
    assert "\n-" in diff and "9.9999" in diff and shown in diff


def test_missing_markers_are_a_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    for mode in ("--write", "--check"):
        with pytest.raises(SystemExit, match="has no results block: add a line <!-- results:begin -->"):
            rs.main(["--root", str(tmp_path), mode, str(readme)])
    assert readme.read_text() == "# no markers\n"


def test_readme_results_block_is_generated_from_committed_files():
    block = rs.readme_block((ROOT / "README.md").read_text(), "README.md")
    assert block == rs.render_results(ROOT / "checkpoints" / "results", relative_to=ROOT), \
        "README.md's Results block is stale: python -m metaopt.evaluate.results --write README.md"


def test_committed_aggregates_are_current():
    """Every committed aggregate.json holds the IQMs of its results.json (recomputed: deterministic; the bootstrap
    intervals are seeded and recomputed by python -m metaopt.evaluate.results --aggregate)."""
    from metaopt.evaluate import aggregate

    checked = 0
    for directory in rs.result_dirs(ROOT / "checkpoints" / "results"):
        stored = aggregate.load(directory)
        results = report.read_results(directory)
        if stored is None:
            assert "adam" not in results["meta"]["optimizers"], f"{directory.name}: no aggregate.json; run python " \
                "-m metaopt.evaluate.results --aggregate --write README.md"
            continue
        table, seeds = aggregate.scores(rs.load_runs(results), list(results["meta"]["tasks"]))
        assert stored["seeds"] == seeds
        for name in aggregate.SCORES:
            assert set(stored[name]) == set(table[name]), directory.name
            for label, values in table[name].items():
                flat = np.sort(values.ravel())
                n = len(flat)
                # rliable's IQM: scipy's trim_mean with 25 % cut at each end
                assert stored[name][label]["iqm"] == pytest.approx(scipy.stats.trim_mean(flat, 0.25), rel=1e-9,
                                                                    nan_ok=True), (directory.name, name, label, n)
        checked += 1
    assert checked >= 1


def test_committed_results_name_the_checkpoints_they_evaluated_and_those_are_current():
    """A result whose learned optimizer's weights have been replaced since is stale: rerun the suite (or remove the
    result) when a checkpoint changes."""
    for directory in rs.result_dirs(ROOT / "checkpoints" / "results"):
        results = report.read_results(directory)
        meta = results["meta"]
        learned = [label for label in meta["optimizers"]
                   if label in SUITES[meta["suite"]].learned or "/" in label]
        assert set(learned) <= set(meta.get("checkpoints", {})), f"{directory.name}: no fingerprint of {learned}"
        for label, record, state in report.checkpoint_states(results):
            assert state == "current", f"{directory.name}: {label} = {record['path']} is {state}; rerun the suite"
        assert (rs.checkpoints_line(results) is not None) == bool(learned)


def test_checkpoint_states_tell_current_stale_missing_and_uncommitted_weights(tmp_path):
    from metaopt.evaluate.experiment import checkpoint_fingerprints

    for name in ("shipped", "replaced", "removed"):
        HyperAdam(num_candidates=2).save_pretrained(tmp_path / "checkpoints" / name)
    (tmp_path / "checkpoints" / "shipped" / "golden.json").write_text('{"final_loss": 162.5}')
    scratch = tmp_path / "runs" / "candidate"
    HyperAdam(num_candidates=2).save_pretrained(scratch)
    records = checkpoint_fingerprints({name: str(tmp_path / "checkpoints" / name)
                                       for name in ("shipped", "replaced", "removed")}
                                      | {"candidate": str(scratch), "adam": "adam"})
    assert records["shipped"]["golden_loss"] == 162.5 and "adam" not in records
    for label, record in records.items():  # paths as a result inside the repository records them
        record["path"] = Path(record["path"]).relative_to(tmp_path).as_posix()
    HyperAdam(num_candidates=3).save_pretrained(tmp_path / "checkpoints" / "replaced")
    (tmp_path / "checkpoints" / "removed" / "model.safetensors").unlink()
    results = {"meta": {"checkpoints": records}}
    states = {label: state for label, _, state in report.checkpoint_states(results, repo_root=tmp_path)}
    assert states == {"shipped": "current", "replaced": "stale", "removed": "missing", "candidate": "uncommitted"}


def test_a_gzipped_results_file_is_read_like_a_plain_one(tmp_path):
    import gzip

    payload = table1(BASE, BASE, BASE, BASE)
    plain = write(tmp_path / "plain" / "r", payload)
    zipped = tmp_path / "zipped" / "r"
    zipped.mkdir(parents=True)
    with gzip.open(zipped / "results.json.gz", "wt") as f:
        json.dump(payload, f)
    assert report.read_results(zipped) == report.read_results(plain) == payload
    assert rs.result_dirs(zipped.parent) == [zipped]
    assert rs.render_results(zipped.parent, relative_to=zipped.parent) == \
        rs.render_results(plain.parent, relative_to=plain.parent)
    with pytest.raises(FileNotFoundError, match="no results.json"):
        report.read_results(tmp_path)
    (plain / "steps.csv").write_text("task,optimizer,seed,step,loss\n")
    (plain / "finals.csv").write_text("task,optimizer,seed,final\nmlp,adam,0,0.25\n")
    assert rs.compact(plain) == [plain / "results.json", plain / "steps.csv", plain / "finals.csv"]
    assert sorted(p.name for p in plain.iterdir()) == ["finals.csv.gz", "results.json.gz"]
    assert report.read_results(plain) == payload
    assert gzip.decompress((plain / "finals.csv.gz").read_bytes()).decode().endswith("mlp,adam,0,0.25\n")
    packed = (plain / "results.json.gz").read_bytes()
    assert rs.compact(plain) == [] and (plain / "results.json.gz").read_bytes() == packed  # idempotent, same bytes


def test_a_set_too_large_for_gzip_is_compacted_to_xz_and_read_back(tmp_path, monkeypatch):
    """Where results.json.gz would not fit the budget beside the directory's other files, compact writes
    results.json.xz instead (deterministically: a second compact changes nothing), and every reader takes it."""
    import gzip
    import lzma

    payload = table1(BASE, BASE, BASE, BASE)
    plain = write(tmp_path / "plain" / "r", payload)
    (plain / "curves.png").write_bytes(b"x" * 1000)
    gz_size = len(gzip.compress(report.json_text(report.read_results(plain)).encode(), compresslevel=9, mtime=0))
    monkeypatch.setattr(rs, "MAX_COMMITTED_BYTES", 1000 + gz_size - 1)
    assert rs.compact(plain) == [plain / "results.json"]
    assert sorted(p.name for p in plain.iterdir()) == ["curves.png", "results.json.xz"]
    assert report.read_results(plain) == payload
    assert json.loads(lzma.decompress((plain / "results.json.xz").read_bytes())) == payload
    packed = (plain / "results.json.xz").read_bytes()
    assert rs.compact(plain) == [] and (plain / "results.json.xz").read_bytes() == packed
    assert rs.result_dirs(plain.parent) == [plain]
    monkeypatch.setattr(rs, "MAX_COMMITTED_BYTES", 3 * 2**20)  # room again: back to gzip, the xz file removed
    assert rs.compact(plain) == [plain / "results.json.xz"]
    assert sorted(p.name for p in plain.iterdir()) == ["curves.png", "results.json.gz"]


def test_figures_are_written_with_a_palette_of_at_most_256_colours(tmp_path):
    from PIL import Image

    runs = [Run("sgd", "mlp", s, [2.0 / (t + 1) + 0.01 * s for t in range(50)], 1e-3, {"loss": 0.5})
            for s in range(3)]
    path = report.plot_curves(runs, tmp_path / "curves.png", title="t")
    with Image.open(path) as image:
        assert image.mode == "P" and len(image.getcolors(256) or []) <= 256


def test_every_committed_result_set_fits_the_size_budget():
    """Each committed results directory (plots, tables, compressed per-step data) stays within the issue's 3 MB."""
    for directory in rs.result_dirs(rs.RESULTS_ROOT):
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        assert size <= rs.MAX_COMMITTED_BYTES, (f"{directory.name}: {size / 2**20:.2f} MiB; run python -m "
                                                f"metaopt.evaluate.results --compact")


def test_compact_rewrites_float32_losses_short_and_losslessly(tmp_path):
    import numpy

    payload = table1(BASE, BASE, BASE, BASE)
    for i, record in enumerate(payload["runs"]):  # float32 losses written at float64's 17 digits, as before
        record["losses"] = [float(numpy.float32(v / 3 + i)) for v in record["losses"]]
    directory = write(tmp_path / "r", payload)
    before = report.runs_from_json(payload["runs"])
    assert rs.compact(directory) == [directory / "results.json"]
    packed = report.read_results(directory)
    assert all(r["float32"] == ["losses"] for r in packed["runs"])
    assert len(json.dumps([r["losses"] for r in packed["runs"]])) < \
        0.7 * len(json.dumps([r["losses"] for r in payload["runs"]]))
    assert report.runs_from_json(packed["runs"]) == before
    assert rs.render_results(tmp_path, relative_to=tmp_path) == rs.render_results(tmp_path, relative_to=tmp_path)


def test_render_quotes_the_command_as_a_shell_line(tmp_path):
    payload = table1(BASE, BASE, BASE, BASE)
    payload["meta"]["command"] = ["python", "-m", "metaopt.evaluate", "--optimizers", "a b,c"]
    text = rs.render_results(write(tmp_path / "r", payload).parent, relative_to=tmp_path)
    assert f"Command: `{shlex.join(payload['meta']['command'])}`" in text and "'a b,c'" in text
    payload["meta"]["earlier_commands"] = [["python", "-m", "metaopt.evaluate", "--tasks", "mlp-relu"]]
    text = rs.render_results(write(tmp_path / "merged" / "r", payload).parent, relative_to=tmp_path)
    assert "merged into the runs of `python -m metaopt.evaluate --tasks mlp-relu`" in text


def test_a_note_beside_the_results_is_shown_under_the_heading(tmp_path):
    directory = write(tmp_path / "r", table1(BASE, BASE, BASE, BASE))
    (directory / rs.NOTE_FILE).write_text("These runs evaluated weights since replaced.\n")
    text = rs.render_results(tmp_path, relative_to=tmp_path)
    assert text.startswith("### The papers' claims")  # the verdicts first, then one section per result set
    heading, facts, note = text[text.index("### hyperadam-table1"):].split("\n\n")[:3]
    assert heading.startswith("### hyperadam-table1") and note == "These runs evaluated weights since replaced."
