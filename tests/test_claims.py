"""The papers' claims: one verdict each, computed from result sets with known outcomes."""

import json
from pathlib import Path

import pytest

from metaopt.evaluate import SUITES, Run, report
from metaopt.evaluate import claims as cl
from metaopt.learned.base import CHECKPOINT_ROOT, fingerprint

BASE = [0.50, 0.61, 0.47, 0.58, 0.52, 0.66]
WIN = [b - 0.01 * (i + 1) for i, b in enumerate(BASE)]    # lower on every seed: p = 1/32 < 0.05
LOSS = [b + 0.01 * (i + 1) for i, b in enumerate(BASE)]   # higher on every seed


def write_set(root, name, suite, finals, *, date="2026-01-01", checkpoints=None, metric="train_loss", losses=None,
              quick=False):
    """A result set of ``suite`` whose runs end at ``finals[(task, label)]`` (one value per seed; ``metric`` other
    than the training loss puts it into the held-out split), or run ``losses[(task, label)]`` (per-step lists)."""
    runs = []
    for (task, label), values in (finals or {}).items():
        for seed, v in enumerate(values):
            split, _, key = metric.partition("_")
            held_out = {key: v} if split in ("test", "val") else {}
            runs.append(Run(label, task, seed, [3.0, v if metric == "train_loss" else 1.0], 1e-3,
                            held_out if split == "test" else {}, val=held_out if split == "val" else {}))
    for (task, label), per_seed in (losses or {}).items():
        runs += [Run(label, task, seed, list(values), 1e-3, {}) for seed, values in enumerate(per_seed)]
    meta = {"suite": suite, "date": date, "dataset": "fashion-mnist", "quick": quick,
            "seeds": sorted({r.seed for r in runs}), "tasks": {r.task: {} for r in runs},
            "optimizers": {r.optimizer: {} for r in runs}, "checkpoints": checkpoints or {}}
    directory = Path(root) / name
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({"meta": meta, "runs": report.runs_to_json(runs)}))
    return directory


def shipped_record(*labels):
    """The records run_suite writes for the checkpoints shipped as ``labels`` now."""
    return {label: {"path": f"checkpoints/{label}", **fingerprint(CHECKPOINT_ROOT / label)} for label in labels}


def claim(suite, check):
    return cl.Claim(suite, "test", "a claim", "—", check)


TABLE2 = ("lstm-sine", "lstm-sine-small-noise", "lstm-sine-2layer")


def test_every_suite_has_a_claim_and_the_table_has_a_row_per_claim(tmp_path):
    assert {c.suite for c in cl.CLAIMS} == set(SUITES)
    rows = cl.claims_table([]).splitlines()
    assert len(rows) == 2 + len(cl.CLAIMS)
    assert all(row.endswith(("**not run** |", "**not testable here** |")) for row in rows[2:])


def test_beats_holds_fails_or_is_not_run_by_the_comparisons_that_ran(tmp_path):
    check = cl.beats("hyperadam", ("adam", "dm"))
    c = claim("hyperadam-table2", check)
    ckpt = shipped_record("hyperadam", "dm")
    wins = {(t, "hyperadam"): WIN for t in TABLE2} | {(t, b): BASE for t in TABLE2 for b in ("adam", "dm")}
    good = write_set(tmp_path / "a", "good", "hyperadam-table2", wins, checkpoints=ckpt)
    verdict = cl.judge(c, [good])
    assert verdict.word == cl.HOLDS and verdict.used == ("good",)
    assert verdict.ours == "hyperadam better than adam 3/3, dm 3/3 tasks (p < 0.05)"

    # one task lost against DM: the claim (every task) does not hold, and the gap is named
    lost = dict(wins) | {("lstm-sine-2layer", "dm"): [v - 0.1 for v in BASE]}
    verdict = cl.judge(c, [write_set(tmp_path / "b", "lost", "hyperadam-table2", lost, checkpoints=ckpt)])
    assert verdict.word == cl.FAILS and "dm 2/3" in verdict.ours
    assert "largest gap: lstm-sine-2layer" in verdict.ours and "vs dm" in verdict.ours

    # DM not run: nothing contradicts the claim, but it is not tested either
    partial = {k: v for k, v in wins.items() if k[1] != "dm"}
    verdict = cl.judge(c, [write_set(tmp_path / "c", "partial", "hyperadam-table2", partial, checkpoints=ckpt)])
    assert verdict.word == cl.NOT_RUN and "dm not run" in verdict.ours

    # at least 2 of 3: one lost task still holds, two do not
    assert cl.judge(claim("hyperadam-table2", cl.beats("hyperadam", ("adam", "dm"), need=2)),
                    [tmp_path / "b" / "lost"]).word == cl.HOLDS
    two_lost = dict(lost) | {("lstm-sine", "dm"): [v - 0.1 for v in BASE]}
    assert cl.judge(claim("hyperadam-table2", cl.beats("hyperadam", ("adam", "dm"), need=2)),
                    [write_set(tmp_path / "d", "x", "hyperadam-table2", two_lost, checkpoints=ckpt)]).word == cl.FAILS
    # a better mean that is not significant is not a win where the claim needs p < 0.05
    close = dict(wins) | {(t, "hyperadam"): [b - 0.001 * (-1) ** i for i, b in enumerate(BASE)] for t in TABLE2}
    close |= {(t, "hyperadam"): [BASE[0] - 0.002] + BASE[1:] for t in TABLE2}
    verdict = cl.judge(c, [write_set(tmp_path / "e", "close", "hyperadam-table2", close, checkpoints=ckpt)])
    assert verdict.word == cl.FAILS
    assert cl.judge(claim("hyperadam-table2", cl.beats("hyperadam", ("adam", "dm"), significance=False)),
                    [tmp_path / "e" / "close"]).word == cl.HOLDS


def test_a_learned_optimizer_counts_only_with_the_weights_shipped_now(tmp_path):
    c = claim("hyperadam-table2", cl.beats("hyperadam", ("adam",)))
    wins = {(t, "hyperadam"): WIN for t in TABLE2} | {(t, "adam"): BASE for t in TABLE2}
    replaced = {"hyperadam": {**shipped_record("hyperadam")["hyperadam"], "weights_sha256": "0" * 64}}
    archived = {"hyperadam": {**shipped_record("hyperadam")["hyperadam"], "path": "checkpoints/hyperadam/old"}}
    for name, record in (("none", None), ("replaced", replaced), ("archived", archived)):
        directory = write_set(tmp_path / name, "set", "hyperadam-table2", wins, checkpoints=record)
        assert cl.judge(c, [directory]).word == cl.NOT_RUN, name
    # a --quick set never counts
    quick = write_set(tmp_path / "quick", "set", "hyperadam-table2", wins, checkpoints=shipped_record("hyperadam"),
                      quick=True)
    assert cl.judge(c, [quick]).word == cl.NOT_RUN


def test_the_ablations_variants_are_shipped_from_their_own_subdirectory(tmp_path, monkeypatch):
    records = {"hyperadam": {"path": "checkpoints/hyperadam-ablation/hyperadam"},
               "hyperadam-J1": {"path": "checkpoints/hyperadam-J1"}}  # not where the ablation's variants live
    monkeypatch.setattr(cl.report, "checkpoint_states",
                        lambda results: [(label, r, "current") for label, r in results["meta"]["checkpoints"].items()])
    directory = write_set(tmp_path, "a", "hyperadam-ablation", {("mlp-3", "hyperadam"): WIN,
                                                                ("mlp-3", "hyperadam-J1"): BASE}, checkpoints=records)
    (result,) = cl.load_sets([directory])
    assert result.current == {"hyperadam"}


def test_a_comparison_on_too_few_seeds_for_the_test_is_not_counted_as_a_loss(tmp_path):
    c = claim("hyperadam-table2", cl.beats("hyperadam", ("adam",)))
    five = {(t, "hyperadam"): WIN[:5] for t in TABLE2} | {(t, "adam"): BASE[:5] for t in TABLE2}
    verdict = cl.judge(c, [write_set(tmp_path, "five", "hyperadam-table2", five,
                                     checkpoints=shipped_record("hyperadam"))])
    assert verdict.word == cl.NOT_RUN and "better than adam not tested tasks" in verdict.ours
    assert "not tested, fewer than 6 paired seeds (no outcome reaches p < 0.05): adam on lstm-sine (5 seeds)" in \
        verdict.ours


def test_each_comparison_comes_from_the_newest_set_that_ran_it(tmp_path):
    c = claim("hyperadam-table2", cl.beats("hyperadam", ("adam", "dm")))
    ckpt = shipped_record("hyperadam", "dm")
    old = write_set(tmp_path, "old", "hyperadam-table2",
                    {(t, "hyperadam"): WIN for t in TABLE2} | {(t, b): BASE for t in TABLE2 for b in ("adam", "dm")},
                    date="2026-01-01", checkpoints=ckpt)
    # the newer set reran Adam only (a split by optimizer): Adam now wins; DM still comes from the old set
    new = write_set(tmp_path, "new", "hyperadam-table2",
                    {(t, "hyperadam"): LOSS for t in TABLE2} | {(t, "adam"): BASE for t in TABLE2},
                    date="2026-02-01", checkpoints=ckpt)
    verdict = cl.judge(c, [old, new])
    assert verdict.word == cl.FAILS and verdict.used == ("new", "old")
    assert "adam 0/3, dm 3/3" in verdict.ours
    other_suite = write_set(tmp_path, "t1", "hyperadam-table1", {("mlp-sigmoid", "hyperadam"): LOSS})
    assert cl.judge(c, [old, other_suite]).word == cl.HOLDS


def test_matches_accepts_ties_and_rejects_significant_losses_and_divergence(tmp_path):
    c = claim("learned-rules", cl.matches((("cam-hd-learned-gamma", "cam-hd-adam"),), metric="test_top1"))
    tasks = [s.label for s in SUITES["learned-rules"].task_specs]
    ckpt = shipped_record("cam-hd-learned-gamma")
    acc = [0.8 + 0.01 * i for i in range(6)]
    tie = {(t, "cam-hd-learned-gamma"): acc for t in tasks} | {(t, "cam-hd-adam"): acc for t in tasks}
    assert cl.judge(c, [write_set(tmp_path / "a", "s", "learned-rules", tie, checkpoints=ckpt,
                                  metric="test_top1")]).word == cl.HOLDS
    worse = dict(tie) | {(tasks[0], "cam-hd-learned-gamma"): [a - 0.01 * (i + 1) for i, a in enumerate(acc)]}
    verdict = cl.judge(c, [write_set(tmp_path / "b", "s", "learned-rules", worse, checkpoints=ckpt,
                                     metric="test_top1")])
    assert verdict.word == cl.FAILS and f"worse: cam-hd-learned-gamma on {tasks[0]}" in verdict.ours
    some = {k: v for k, v in tie.items() if k[0] != tasks[-1]}
    verdict = cl.judge(c, [write_set(tmp_path / "c", "s", "learned-rules", some, checkpoints=ckpt,
                                     metric="test_top1")])
    assert verdict.word == cl.NOT_RUN and "3/3 tasks run (of 4)" in verdict.ours
    # a seed that diverged counts against the rule only where the baseline did not diverge too
    nan = float("nan")
    alone = dict(tie) | {(tasks[1], "cam-hd-learned-gamma"): acc[:-1] + [nan]}
    assert cl.judge(c, [write_set(tmp_path / "d", "s", "learned-rules", alone, checkpoints=ckpt,
                                  metric="test_top1")]).word == cl.FAILS
    together = alone | {(tasks[1], "cam-hd-adam"): acc[:-1] + [nan]}
    assert cl.judge(c, [write_set(tmp_path / "e", "s", "learned-rules", together, checkpoints=ckpt,
                                  metric="test_top1")]).word == cl.HOLDS


def test_interior_best_of_the_gamma_sweep(tmp_path):
    suite = SUITES["hypergrad-combination"]
    c = claim("hypergrad-combination", cl.interior_best())
    tasks = [s.label for s in suite.task_specs]

    def sweep(best):
        return {(t, label): [0.9 - abs(g - best) * 0.1 + 0.001 * i for i in range(3)]
                for t in tasks for label, (_, g) in suite.sweep.points.items()}

    verdict = cl.judge(c, [write_set(tmp_path / "a", "s", "hypergrad-combination", sweep(0.6), metric="test_top1")])
    assert verdict.word == cl.HOLDS and "best gamma_global 0.6" in verdict.ours
    assert cl.judge(c, [write_set(tmp_path / "b", "s", "hypergrad-combination", sweep(1.0),
                                  metric="test_top1")]).word == cl.FAILS


def test_least_sensitive_compares_the_spread_over_the_grid(tmp_path):
    suite = SUITES["tlr-robustness"]
    tasks = [s.label for s in suite.task_specs]
    c = claim("tlr-robustness", cl.least_sensitive("tlr", ("sgd",)))

    def grid(tlr_spread, sgd_spread):
        finals = {}
        for label, (series, lr) in suite.sweep.points.items():
            spread = {"tlr": tlr_spread, "sgd": sgd_spread}.get(series)
            if spread is not None:
                finals |= {(t, label): [0.3 * (1 + spread * (lr == 1e-3)) + 0.01 * i for i in range(3)]
                           for t in tasks}
        return finals

    verdict = cl.judge(c, [write_set(tmp_path / "a", "s", "tlr-robustness", grid(0.1, 2.0))])
    assert verdict.word == cl.HOLDS and "tlr 1." in verdict.ours and "sgd 2." in verdict.ours
    assert cl.judge(c, [write_set(tmp_path / "b", "s", "tlr-robustness", grid(2.0, 0.1))]).word == cl.FAILS
    incomplete = {k: v for k, v in grid(0.1, 2.0).items() if k[0] != tasks[0]}
    assert cl.judge(c, [write_set(tmp_path / "c", "s", "tlr-robustness", incomplete)]).word == cl.NOT_RUN


def test_keeps_decreasing_needs_no_divergence_and_a_falling_tail(tmp_path):
    tasks = [s.label for s in SUITES["hyperadam-long"].task_specs]
    c = claim("hyperadam-long", cl.keeps_decreasing("hyperadam"))
    ckpt = shipped_record("hyperadam")
    falling = [[2.0 / (1 + 0.1 * k + seed) for k in range(100)] for seed in range(3)]
    flat = [[1.0] * 50 + [1.01] * 50 for _ in range(3)]
    nan = [falling[0][:-1] + [float("nan")]] + falling[1:]
    assert cl.judge(c, [write_set(tmp_path / "a", "s", "hyperadam-long", None, checkpoints=ckpt,
                                  losses={(t, "hyperadam"): falling for t in tasks})]).word == cl.HOLDS
    for name, bad in (("flat", flat), ("nan", nan)):
        losses = {(t, "hyperadam"): falling for t in tasks} | {(tasks[0], "hyperadam"): bad}
        verdict = cl.judge(c, [write_set(tmp_path / name, "s", "hyperadam-long", None, checkpoints=ckpt,
                                         losses=losses)])
        assert verdict.word == cl.FAILS, name
    assert "1 of 3 seeds diverged" in verdict.ours


def test_protocol_names_the_dataset_and_seed_differences(tmp_path):
    c = next(x for x in cl.CLAIMS if x.suite == "hyperadam-table2")
    ckpt = shipped_record("hyperadam", "dm", "rnnprop")
    d = write_set(tmp_path, "s", "hyperadam-table2", {(t, "hyperadam"): WIN for t in TABLE2}
                  | {(t, b): BASE for t in TABLE2 for b in ("adam", "dm", "rnnprop")}, checkpoints=ckpt)
    verdict = cl.judge(c, [d])
    text = cl.protocol(c, verdict, [d])
    assert "6 seeds (suite: 100)" in text and "MNIST" not in text  # the sines are generated in both
    payload = json.loads((d / "results.json").read_text())
    payload["meta"]["steps"] = 50
    (d / "results.json").write_text(json.dumps(payload))
    assert cl.protocol(c, verdict, [d]).endswith("6 seeds (suite: 100); 50 steps (suite: 100); Adam's rate tuned on "
                                                 "a √2 grid here")
    t1 = next(x for x in cl.CLAIMS if x.suite == "hyperadam-table1")
    d1 = write_set(tmp_path, "t1", "hyperadam-table1", {("mlp-sigmoid", "adam"): BASE})
    assert cl.protocol(t1, cl.Verdict(cl.NOT_RUN, "", ("t1",)), [d1]).startswith("Fashion-MNIST for MNIST")


@pytest.mark.parametrize("word", [cl.HOLDS, cl.FAILS, cl.NOT_RUN])
def test_all_of_takes_the_weakest_verdict(word):
    def fixed(w):
        return lambda claim, sets: cl.Verdict(w, w, (w,))

    order = [cl.HOLDS, cl.NOT_RUN, cl.FAILS]
    checks = [fixed(w) for w in order[:order.index(word) + 1]]
    verdict = cl.all_of(*checks)(None, [])
    assert verdict.word == word and verdict.ours == "; ".join(order[:order.index(word) + 1])
