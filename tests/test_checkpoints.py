"""Committed checkpoints: each loads by name with no other argument and reproduces its golden loss."""

import json
from pathlib import Path

import pytest
import torch

import metaopt
from metaopt.checkpoint import GOLDEN_FILE, golden_loss, write_golden
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
