"""Meta-gradient estimators: TruncatedBPTT is the unroll's mean meta-loss gradient with a detached boundary, and the
trainer makes its meta-gradient only through the estimator it is given."""

import torch

from metaopt.meta import MetaTrainer, unroll
from metaopt.meta.estimators import Estimate, MetaGradientEstimator, TruncatedBPTT
from test_meta import theta, tiny_config


def test_truncated_bptt_is_the_gradient_of_the_mean_unrolled_meta_loss_and_carries_detached_state(tmp_path):
    trainer = MetaTrainer(tiny_config(meta_batch=4), tmp_path)
    lopt, slots, config = trainer.lopt, trainer.slots, trainer.config
    assert len({id(s.task.base()) for s in slots}) == 4  # one unroll per instance, so the reference below is exact
    generators = [s.batch_gen.get_state() for s in slots]
    before = [(s.params, s.opt_state) for s in slots]

    outs = [unroll(lopt, [s], config.truncation, lr=config.lr, batch_size=config.batch_size) for s in slots]
    reference = torch.autograd.grad(torch.cat([o.meta_losses for o in outs]).mean(), list(lopt.parameters()))
    for s, state in zip(slots, generators):
        s.batch_gen.set_state(state)  # the estimator draws the same batches again

    trainer.outer.zero_grad(set_to_none=False)
    estimate = TruncatedBPTT().estimate(lopt, slots, config)
    for p, g in zip(lopt.parameters(), reference):
        assert torch.equal(p.grad, g)
    assert torch.equal(estimate.meta_loss, torch.cat([o.meta_losses for o in outs]).mean().detach())
    assert estimate.inner_loss == sum(o.inner_loss for o in outs) / len(outs)
    assert all(s.params is p and s.opt_state is o for s, (p, o) in zip(slots, before))  # left to the trainer
    for o, params, state in zip(outs, estimate.params, estimate.opt_states):
        assert type(params) is dict and type(state) is type(o.opt_states[0])
        assert all(type(field) is dict for field in state)
        carried = list(params.values()) + [t for field in state for t in field.values()]
        unrolled = list(o.params[0].values()) + [t for field in o.opt_states[0] for t in field.values()]
        assert all(t.grad_fn is None and not t.requires_grad for t in carried)  # the truncation boundary
        assert all(torch.equal(a, b) for a, b in zip(carried, unrolled))


def test_the_default_estimator_is_truncated_bptt_bit_for_bit(tmp_path):
    default = MetaTrainer(tiny_config(meta_batch=4), tmp_path / "a")
    explicit = MetaTrainer(tiny_config(meta_batch=4), tmp_path / "b", estimator=TruncatedBPTT())
    assert isinstance(default.estimator, TruncatedBPTT)
    for _ in range(4):  # past the horizon: instances are reset in both
        a, b = default.meta_step_once(), explicit.meta_step_once()
        a.pop("inner_steps_per_s"), b.pop("inner_steps_per_s")  # wall time
        assert a == b
    for k, v in theta(default).items():
        assert torch.equal(v, theta(explicit)[k]), k
    for s, t in zip(default.slots, explicit.slots):
        assert all(torch.equal(s.params[n], t.params[n]) for n in s.params)


class RecordingEstimator(MetaGradientEstimator):
    """Truncated BPTT with its meta-gradient multiplied by ``scale``, recording what the trainer passes it."""

    def __init__(self, scale: float):
        self.scale, self.calls, self.inner = scale, [], TruncatedBPTT()

    def estimate(self, lopt, slots, config) -> Estimate:
        self.calls.append((lopt, list(slots), config))
        estimate = self.inner.estimate(lopt, slots, config)
        for p in lopt.parameters():
            p.grad.mul_(self.scale)
        return estimate


def test_the_trainer_makes_its_meta_gradient_only_through_its_estimator(tmp_path):
    zero = RecordingEstimator(0.0)
    trainer = MetaTrainer(tiny_config(val_every=0), tmp_path / "zero", estimator=zero)
    start = theta(trainer)
    metrics = [trainer.meta_step_once() for _ in range(3)]
    assert len(zero.calls) == 3
    assert all(lopt is trainer.lopt and config is trainer.config for lopt, _, config in zero.calls)
    assert [s.step for s in trainer.slots] == [2, 4]  # the trainer stored the estimator's state and counted steps
    assert all(m["grad_norm"] == 0.0 and m["meta_loss"] > 0 for m in metrics)
    for k, v in start.items():  # Adam with a zero meta-gradient does not move theta
        assert torch.equal(v, theta(trainer)[k]), k

    plain = MetaTrainer(tiny_config(val_every=0), tmp_path / "plain")
    for _ in range(3):
        plain.meta_step_once()
    assert any(not torch.equal(v, theta(plain)[k]) for k, v in start.items())
