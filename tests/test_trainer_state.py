"""The training state file's optimizer states: version 2 saves each slot's state as its list of pytree leaves and
restores it into the structure the learned optimizer builds (any pytree: the learned CAM-HD γ nests CamHDRule's
state); version 1 files ({field: {name: tensor}} of a NamedTuple of dicts, HyperAdam's, DMoptimizer's, RNNprop's)
still resume bit for bit; a state of another layout is refused with a message that says which tensor and why."""

import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_structure

from meta_tasks.base import FixedFamily
from meta_tasks.tasks import QuadraticTask
from metaopt.learned.rules import LearnedRuleState
from metaopt.meta import MetaTrainer, TrainingStateError, preset
from metaopt.meta.trainer import STATE_FILE, STATE_VERSION, restore_opt_state
from test_meta import theta, tiny_config


def _as_version_1(run_dir, trainer):
    """Rewrite ``run_dir``'s state file as the version-1 code wrote it (``{field: dict(value)}`` per slot)."""
    path = run_dir / STATE_FILE
    state = torch.load(path, weights_only=True)
    assert state["version"] == STATE_VERSION == 2
    state["version"] = 1
    for saved, slot in zip(state["slots"], trainer.slots, strict=True):
        saved["opt_state"] = {f: dict(v) for f, v in zip(slot.opt_state._fields, slot.opt_state)}
    torch.save(state, path)


def _same_states(a, b):
    assert tree_structure(a) == tree_structure(b)
    return all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


def test_version_2_saves_each_slot_state_as_its_leaves(tmp_path):
    trainer = MetaTrainer(tiny_config(meta_steps=2), tmp_path)
    trainer.run(progress=False)
    saved = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert saved["version"] == 2
    for slot, entry in zip(trainer.slots, saved["slots"], strict=True):
        assert isinstance(entry["opt_state"], list)
        assert all(torch.equal(x, y) for x, y in zip(entry["opt_state"], tree_leaves(slot.opt_state), strict=True))


def test_a_version_1_state_resumes_bit_for_bit(tmp_path):
    straight = MetaTrainer(tiny_config(meta_steps=8), tmp_path / "a")
    straight.run(progress=False)
    half = MetaTrainer(tiny_config(meta_steps=4), tmp_path / "b")
    half.run(progress=False)
    _as_version_1(tmp_path / "b", half)
    resumed = MetaTrainer(tiny_config(meta_steps=8), tmp_path / "b", resume=True)
    assert resumed.meta_step == 4
    for a, b in zip(half.slots, resumed.slots, strict=True):
        assert type(a.opt_state) is type(b.opt_state) and _same_states(a.opt_state, b.opt_state)
    resumed.run(progress=False)
    for k, v in theta(straight).items():
        assert torch.equal(v, theta(resumed)[k]), k
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["version"] == 2  # written anew as version 2


def _learned_gamma_trainer(run_dir, meta_steps=2, resume=False):
    family = FixedFamily(QuadraticTask.sample(torch.Generator().manual_seed(0), dim=6))
    config = preset("cam-hd-learned-gamma", family="quadratic", horizon=4, truncation=2, meta_batch=2,
                    meta_steps=meta_steps, val_every=0, lr=0.002, optimizer_kwargs='{"hypergrad_lr": 1e-6}')
    return MetaTrainer(config, run_dir, family=family, resume=resume)


def test_a_nested_state_round_trips_and_another_layout_is_refused(tmp_path):
    trainer = _learned_gamma_trainer(tmp_path)
    trainer.run(progress=False)
    resumed = _learned_gamma_trainer(tmp_path, resume=True)
    for a, b in zip(trainer.slots, resumed.slots, strict=True):
        assert isinstance(b.opt_state, LearnedRuleState) and _same_states(a.opt_state, b.opt_state)
        assert b.opt_state.rule.step.dtype == torch.int64 and int(b.opt_state.rule.step) == a.step  # the count

    fresh = trainer.lopt.init(trainer.slots[0].params)
    leaves = tree_leaves(trainer.slots[0].opt_state)
    with pytest.raises(TrainingStateError, match=r"slot 0: the saved optimizer state has \d+ tensors"):
        restore_opt_state(leaves[:-1], fresh, 2, "state.pt: slot 0")
    bad = list(leaves)
    bad[0] = bad[0].float()  # the step count, an int64
    with pytest.raises(TrainingStateError, match=r"slot 0: optimizer state\.rule\.step was saved as \(\) "
                                                 r"torch\.float32, but this run builds \(\) torch\.int64"):
        restore_opt_state(bad, fresh, 2, "state.pt: slot 0")
    # the learned rules' version-1 states (NamedTuples of per-parameter dicts) have no counterpart any more
    mirror = {"step": {"theta": torch.zeros((), dtype=torch.int64)}, "alpha_param_change": {"theta": torch.zeros(6)}}
    with pytest.raises(TrainingStateError, match="version 1's layout"):
        restore_opt_state(mirror, fresh, 1, "state.pt: slot 0")


def test_a_version_1_state_of_a_changed_parameter_set_is_refused(tmp_path):
    trainer = MetaTrainer(tiny_config(meta_steps=2), tmp_path)
    trainer.run(progress=False)
    fresh = trainer.slots[0].opt_state
    saved = {f: {f"renamed.{n}": t for n, t in v.items()} for f, v in zip(fresh._fields, fresh)}
    with pytest.raises(TrainingStateError, match="version 1's layout"):
        restore_opt_state(saved, fresh, 1, "state.pt: slot 0")
