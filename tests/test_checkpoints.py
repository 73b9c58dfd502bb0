"""Committed checkpoints: each loads by name with no other argument and reproduces its golden loss; a model card
is generated from the meta-training run directory, its golden test and its frozen evaluation."""

import json
import shlex
from pathlib import Path

import pytest
import torch

import metaopt
from metaopt.cards import golden_loss, write_golden
from metaopt.checkpoint import GOLDEN_FILE
from metaopt.learned import HyperAdam
from metaopt.learned.base import CHECKPOINT_ROOT, LEARNED_NAMES

COMMITTED = sorted(p.name for p in CHECKPOINT_ROOT.iterdir() if (p / "config.json").is_file()) \
    if CHECKPOINT_ROOT.is_dir() else []


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_checkpoint_loads_by_name_and_reproduces_its_golden_loss(name):
    directory = CHECKPOINT_ROOT / name
    assert name in LEARNED_NAMES, f"checkpoints/{name} is not a registered learned optimizer name"
    for required in ("config.json", "model.safetensors", "README.md", GOLDEN_FILE):
        assert (directory / required).is_file(), f"checkpoints/{name}/{required} is missing"
    opt = metaopt.make_optimizer(name, [torch.zeros(3, requires_grad=True)])  # no other argument
    assert opt.param_groups[0]["lr"] > 0
    golden = json.loads((directory / GOLDEN_FILE).read_text())
    assert golden_loss(name, golden) == pytest.approx(golden["final_loss"], rel=1e-5)


def test_golden_run_records_its_step_size_and_loss_scale(tmp_path):
    directory = HyperAdam(num_candidates=3).save_pretrained(tmp_path / "ckpt")
    record = write_golden(directory, lr=0.001, loss_scale=0.01)
    assert record["hparams"] == {"lr": 0.001} and record["task_options"] == {"scale": 0.01}
    assert golden_loss(str(directory), record) == record["final_loss"] != golden_loss(str(directory))
    assert json.loads(Path(directory, GOLDEN_FILE).read_text()) == record


def test_golden_loss_is_deterministic_and_detects_a_changed_weight(tmp_path):
    lopt = HyperAdam(num_candidates=3)
    directory = lopt.save_pretrained(tmp_path / "ckpt")
    record = write_golden(directory)
    assert golden_loss(str(directory)) == record["final_loss"]
    with torch.no_grad():
        lopt.weight.bias.add_(0.01)
    lopt.save_pretrained(directory)
    assert golden_loss(str(directory)) != record["final_loss"]
    assert json.loads(Path(directory, GOLDEN_FILE).read_text())["final_loss"] == record["final_loss"]


# ----------------------------------------------------------------------------------------------------------------------
# Model cards

TINY_RUN = ["--preset", "hyperadam-paper", "--optimizer-kwargs", '{"num_candidates": 2}', "--family", "quadratic",
            "--horizon", "4", "--truncation", "2", "--meta-batch", "2", "--meta-steps", "3", "--val-every", "3",
            "--val-tasks", "2", "--lr", "0.05", "--batch-size", "4", "--outer-lr", "0.01", "--rs-learner", "1",
            "--convex-k", "3", "--log-every", "1", "--device", "cpu", "--export", "best"]


def test_model_card_is_generated_from_the_run_directory(tmp_path, capsys):
    from metaopt import cards, evaluate
    from metaopt.meta import cli

    run, ckpt, eval_dir = tmp_path / "run", tmp_path / "ckpt", tmp_path / "eval"
    argv = [*TINY_RUN, "--run-dir", str(run), "--out", str(ckpt)]
    assert cli.main(argv) == 0
    evaluate.run_suite("hyperadam-table1", optimizers=["hyperadam", "adam"], tasks=["quadratic"], seeds=2, steps=3,
                       sources={"hyperadam": str(ckpt)}, tune=False, out=eval_dir, progress=False,
                       command=["python", "-m", "metaopt.evaluate", "--tasks", "quadratic"])
    notes = tmp_path / "notes.md"
    notes.write_text("Why this recipe: a test.\n")
    command = "python train_meta.py " + " ".join(shlex.quote(a) for a in argv)
    assert cards.main([str(ckpt), "--card", "--run-dir", str(run), "--command", command, "--device-note",
                       "a test CPU", "--eval-dir", str(eval_dir), "--notes-file", str(notes)]) == 0

    from metaopt.cards import split_front_matter

    header, card = split_front_matter((ckpt / "README.md").read_text())
    assert header.startswith("---\nlibrary_name: metaopt\n")
    summary = json.loads((run / "summary.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [line["meta_loss"] for line in log]
    assert summary["meta_step"] == len(log) == 3 and summary["meta_loss"] == losses[-1]
    assert card.startswith("# ckpt — HyperAdam meta-trained on `quadratic`\n\nWhy this recipe: a test.\n")
    assert "task family `quadratic`" in card and "meta-batch 2, seed 0" in card and "| `seed` | `0` |" in card
    assert (f"3 meta-steps (12 inner steps; 0 skipped as non-finite) in {summary['wall_seconds']:.1f} s of wall "
            "time on cpu (a test CPU)") in card
    mean = sum(losses) / 3  # fewer than 50 meta-steps: the first and the last windows are the whole run
    assert (f"mean {mean:.4g} over the first 3 meta-steps, {mean:.4g} over the last 3; final "
            f"{losses[-1]:.5g}") in card
    assert f"lower is better): {log[2]['val_score']:.4f} at meta-step 3, the only validation." in card
    assert "identical to the run's `best/` and `last/` checkpoint" in card
    assert f"```bash\n{command}\n```" in card
    golden = json.loads((ckpt / GOLDEN_FILE).read_text())
    assert golden["final_loss"] == golden_loss(str(ckpt)) and f"final training loss {golden['final_loss']:.6g}" in card
    table = (eval_dir / "table.md").read_text()
    assert [line for line in table.splitlines() if line.startswith("| quadratic |")] and \
        all(line in card for line in table.splitlines() if line.startswith("|"))
    assert "\n### hyperadam-table1: 2 seeds, 3 steps" in card  # table.md's heading, one level down
    assert "files in [`../eval/`](../eval/). Command: `python -m metaopt.evaluate --tasks quadratic`" in card
    assert (ckpt / "train-log.jsonl").read_bytes() == (run / "log.jsonl").read_bytes()
    assert (ckpt / "train-summary.json").read_bytes() == (run / "summary.json").read_bytes()

    (ckpt / GOLDEN_FILE).unlink()
    assert cards.main([str(ckpt)]) == 0  # a plain DIR: golden.json only, as before
    assert json.loads((ckpt / GOLDEN_FILE).read_text()) == golden
    with pytest.raises(SystemExit):
        cards.main([str(ckpt), "--card", "--command", command])
    assert "--card needs --run-dir" in capsys.readouterr().err


def test_golden_run_takes_a_step_size_and_refuses_a_non_finite_fingerprint(tmp_path):
    lopt = HyperAdam(num_candidates=3)
    directory = lopt.save_pretrained(tmp_path / "ckpt")
    record = write_golden(directory, lr=1e-3)
    assert record["hparams"] == {"lr": 1e-3}
    assert golden_loss(str(directory), record) == record["final_loss"]
    assert record["final_loss"] != write_golden(directory)["final_loss"]  # the default rate gives another loss
    with pytest.raises(ValueError, match="non-finite.*--golden-lr"):
        write_golden(directory, lr=1e20)  # the quadratic overflows to inf


CAMPAIGN_RUN = ["--preset", "hyperadam-paper", "--optimizer-kwargs", '{"num_candidates": 2}', "--family", "quadratic",
                "--horizon", "4", "--truncation", "2", "--meta-batch", "2", "--val-every", "2", "--val-tasks", "2",
                "--lr", "0.05", "--batch-size", "4", "--convex-k", "3", "--no-compile", "--outer-lr", "1e-2"]


def test_campaign_card_reports_the_pieces_the_weights_and_their_evaluation(tmp_path, monkeypatch):
    from metaopt import cards, evaluate
    from metaopt.cards import split_front_matter
    from metaopt.meta import campaign
    from metaopt.meta.cli import main

    monkeypatch.chdir(tmp_path)
    camp, ckpt, eval_dir = tmp_path / "campaign", tmp_path / "ckpt", tmp_path / "eval"
    assert main([*CAMPAIGN_RUN, "--meta-steps", "2", "--run-dir", "a", "--campaign", str(camp)]) == 0
    assert main([*CAMPAIGN_RUN, "--meta-steps", "6", "--run-dir", "b", "--campaign", str(camp), "--export", "best",
                 "--out", str(ckpt)]) == 0
    scores = {m["meta_step"]: m["val_score"] for m in campaign.log(camp) if "val_score" in m}
    best = min(scores, key=lambda k: (scores[k], k))
    evaluate.run_suite("hyperadam-table1", optimizers=["hyperadam", "adam"], tasks=["quadratic"], seeds=3, steps=3,
                       sources={"hyperadam": str(ckpt)}, tune=False, out=eval_dir, progress=False)
    command = "python -m metaopt.checkpoint ckpt --card --campaign campaign"
    assert cards.main([str(ckpt), "--card", "--campaign", str(camp), "--command", command, "--eval-dir",
                       str(eval_dir)]) == 0

    header, card = split_front_matter((ckpt / "README.md").read_text())
    assert f"value: {round(scores[best], 6)}" in header and f"meta_steps: {best}" in header
    assert card.startswith("# ckpt — HyperAdam meta-trained on `quadratic` (a campaign)\n")
    assert f"θ at meta-step {best:,} of the campaign in [`../campaign/`](../campaign/) ({best * 4:,} inner steps)" \
        in card
    assert f"{scores[best]:.4f} at meta-step {best:,}" in card
    assert "| 1 | 0–2 | 8 |" in card and "| 2 | 2–6 | 16 |" in card  # both pieces
    assert "Campaign so far**: 2 piece(s), 6 meta-steps, 24 inner steps" in card
    assert f"```bash\n{command}\n```" in card and "| `family` | `quadratic` |" in card
    (row,) = [line for line in card.splitlines() if line.startswith("| quadratic |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 5 and cells[1].count("±") == 1 and cells[2].count("±") == 1  # hyperadam, adam, p, ratio
    assert 0 < float(cells[3]) <= 1 and float(cells[4]) > 0
    assert (ckpt / "validation.png").stat().st_size > 0
    assert json.loads((ckpt / "train-summary.json").read_text())["meta_step"] == best

    other = next(k for k in scores if k != best)
    with pytest.raises(ValueError, match="meta-step 5 was not validated"):
        cards.main([str(ckpt), "--card", "--campaign", str(camp), "--command", command, "--meta-step", "5"])
    assert cards.main([str(ckpt), "--card", "--campaign", str(camp), "--command", command, "--meta-step",
                       str(other)]) == 0  # a stated step: trusted, and the card says that step
    assert f"θ at meta-step {other:,} of the campaign" in (ckpt / "README.md").read_text()
    HyperAdam(num_candidates=2).save_pretrained(ckpt)  # no longer the campaign's best
    with pytest.raises(ValueError, match="not the campaign's best/.*--meta-step"):
        cards.main([str(ckpt), "--card", "--campaign", str(camp), "--command", command])
    with pytest.raises(ValueError, match="did not evaluate the weights now in"):
        cards.main([str(ckpt), "--card", "--campaign", str(camp), "--command", command, "--meta-step",
                    str(best), "--eval-dir", str(eval_dir)])


def test_a_pretrained_name_loads_its_own_weights_and_is_not_meta_trained():
    from metaopt.learned.base import is_class_name, register_pretrained
    from metaopt.meta.config import MetaConfig
    from metaopt.meta.trainer import build_optimizer

    assert LEARNED_NAMES["hyperadam-general"] is HyperAdam and is_class_name("hyperadam")
    assert not is_class_name("hyperadam-general")
    general, paper = metaopt.from_pretrained("hyperadam-general"), metaopt.from_pretrained("hyperadam")
    assert type(general) is HyperAdam and any(not torch.equal(a, b) for a, b in zip(general.state_dict().values(),
                                                                                    paper.state_dict().values()))
    with pytest.raises(ValueError, match="names pretrained weights of HyperAdam.*--optimizer hyperadam"):
        build_optimizer(MetaConfig(optimizer="hyperadam-general"))
    with pytest.raises(ValueError, match="already registered"):
        register_pretrained("hyperadam-general", HyperAdam)
    with pytest.raises(ValueError, match="not a registered learned optimizer class"):
        register_pretrained("something-new", torch.nn.Module)


@pytest.mark.parametrize("name", ["hyperadam", "hyperadam-general", "dm", "rnnprop", "cam-hd-learned-gamma",
                                  "marthe-learned-mu"])
def test_shipped_cards_carry_current_machine_readable_front_matter(name, tmp_path):
    """Model-hub front matter (library, tags, training data, metrics) that agrees with the checkpoint's own files,
    and is what ``python -m metaopt.checkpoint --front-matter`` writes (so a stale header fails here)."""
    import shutil

    import yaml

    from metaopt.cards import refresh_front_matter, split_front_matter

    directory = CHECKPOINT_ROOT / name
    header, body = split_front_matter((directory / "README.md").read_text())
    fields = yaml.safe_load(header.strip("-\n"))
    weights = json.loads((directory / "config.json").read_text())
    golden = json.loads((directory / GOLDEN_FILE).read_text())
    summary = json.loads((directory / "train-summary.json").read_text())
    assert fields["library_name"] == "metaopt" and name in fields["tags"] and weights["class"] in fields["tags"]
    assert fields["datasets"] == ["zalando-datasets/fashion_mnist"] and fields["metrics"] == ["loss"]
    (result,) = fields["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == round(summary["best_val_score"], 6)
    assert fields["metaopt"]["config"] == weights["config"] and fields["metaopt"]["golden_final_loss"] == \
        golden["final_loss"]
    assert body.startswith(f"# {name} ")
    copy = tmp_path / name
    shutil.copytree(directory, copy)
    refresh_front_matter(copy)
    assert (copy / "README.md").read_text() == (directory / "README.md").read_text()
