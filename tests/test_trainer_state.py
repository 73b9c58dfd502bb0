"""The training state file's optimizer states: version 2 saves each slot's state as its list of pytree leaves and
restores it into the structure the learned optimizer builds (any pytree of tensors); version 1 files
({field: {name: tensor}} of a NamedTuple of dicts, HyperAdam's, DMoptimizer's, RNNprop's) still resume bit for bit; a
state of another layout is refused with a message that says which tensor and why."""

import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_structure

from metaopt.meta import MetaTrainer, TrainingStateError
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


def test_a_version_1_state_of_a_changed_parameter_set_is_refused(tmp_path):
    trainer = MetaTrainer(tiny_config(meta_steps=2), tmp_path)
    trainer.run(progress=False)
    fresh = trainer.slots[0].opt_state
    saved = {f: {f"renamed.{n}": t for n, t in v.items()} for f, v in zip(fresh._fields, fresh)}
    with pytest.raises(TrainingStateError, match="version 1's layout"):
        restore_opt_state(saved, fresh, 1, "state.pt: slot 0")
