"""Meta-gradient estimators: how one meta-step turns the meta-batch's slots into a gradient on θ.

The trainer (:mod:`.trainer`) does not know how a meta-gradient is made. It zeroes θ's gradients, calls
``estimator.estimate(lopt, slots, config)`` and then all-reduces, checks, clips and steps; the estimator leaves its
meta-gradient in the ``.grad`` of ``lopt``'s parameters and returns an :class:`Estimate`: the meta-loss and
inner-loss statistics to log, and each slot's inner parameters and optimizer state to carry into the next truncation.
Truncated backpropagation through time (:class:`TruncatedBPTT`) is the estimator today; an evolution-strategies or
PES estimator (Vicol et al., 2021, "Unbiased Gradient Estimation in Unrolled Computation Graphs with Persistent
Evolution Strategies") is another subclass of :class:`MetaGradientEstimator`, with no change to the trainer.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from metaopt.learned.base import LearnedOptimizer
from metaopt.meta.config import MetaConfig
from metaopt.meta.unroll import Params, Slot, UnrollResult, unroll


class Estimate(NamedTuple):
    """What one call of :meth:`MetaGradientEstimator.estimate` returns (the meta-gradient itself is in θ's ``.grad``).

    ``params`` and ``opt_states`` are in the order of the slots passed in, detached from every graph: the state the
    trainer stores in each slot for the next truncation.
    """

    meta_loss: Tensor           # () the meta-loss averaged over the slots, detached
    inner_loss: float           # mean training loss over the slots and the truncation's inner steps (for logging)
    params: list[Params]        # per slot, the inner parameters at the end of the truncation
    opt_states: list[Any]       # per slot, the learned optimizer's state (any pytree of tensors) at the same point


class MetaGradientEstimator(abc.ABC):
    """The interface between the trainer and a way of estimating ∇θ of the meta-loss.

    Subclasses implement :meth:`estimate`. An estimator does not modify the slots (the trainer stores the returned
    state in them, counts their steps and resets diverged or finished instances) and does not step θ.
    """

    @abc.abstractmethod
    def estimate(self, lopt: LearnedOptimizer, slots: list[Slot], config: MetaConfig) -> Estimate:
        """Advance every slot by ``config.truncation`` inner steps of ``lopt`` and add the meta-gradient of the mean
        meta-loss over the slots to the ``.grad`` of ``lopt.parameters()`` (the caller zeroes them first)."""


class TruncatedBPTT(MetaGradientEstimator):
    """Truncated backpropagation through time: the exact gradient of each truncation's meta-loss, biased by cutting
    the graph at every truncation boundary (Andrychowicz et al., 2016; HyperAdam, Wang et al., 2019, eq. 8).

    The slots are grouped by task configuration (``task.base()``), each group is one vectorized :func:`unroll` of
    ``config.truncation`` steps with the options ``config`` names, the meta-loss is the mean over all instances, and
    its backward fills θ's gradients. The carried state is detached: no gradient crosses from one truncation into the
    next.

    Args:
        unroll_fn: the unroll to differentiate through, called as :func:`metaopt.meta.unroll.unroll` is (default:
            that function).
    """

    def __init__(self, unroll_fn: Callable[..., UnrollResult] = unroll):
        self.unroll_fn = unroll_fn

    def estimate(self, lopt: LearnedOptimizer, slots: list[Slot], config: MetaConfig) -> Estimate:
        groups: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            groups.setdefault(id(slot.task.base()), []).append(i)
        meta_losses, inner_losses = [], []
        results: list[tuple[Params, Any] | None] = [None] * len(slots)
        for indices in groups.values():
            out = self.unroll_fn(lopt, [slots[i] for i in indices], config.truncation, lr=config.lr,
                                 batch_size=config.batch_size, meta_loss=config.meta_loss,
                                 second_order=config.second_order, loss_clip=config.loss_clip or None,
                                 recompute=config.recompute, fused=config.fused, compile=config.compile)
            meta_losses.append(out.meta_losses)
            inner_losses.append(out.inner_loss * len(indices))
            for j, i in enumerate(indices):
                results[i] = (out.params[j], out.opt_states[j])
        meta_loss = torch.cat(meta_losses).mean()
        meta_loss.backward()
        # The truncation boundary: the inner state is carried on, detached from this truncation's graph.
        carried = tree_map(torch.Tensor.detach, results)
        return Estimate(meta_loss.detach(), sum(inner_losses) / len(slots), [p for p, _ in carried],
                        [s for _, s in carried])
