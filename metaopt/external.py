"""The parameter-free and schedule-free baselines practitioners use instead of tuning a learning rate, registered
over their authors' maintained packages (never reimplemented here) at their authors' defaults:

=====================  ========================================  ====================================================
name                   package (version tested)                  what it is
=====================  ========================================  ====================================================
``schedule-free-adamw``  ``schedulefree`` 1.4.1                   Schedule-Free AdamW (Defazio et al. 2024), lr 0.0025
``prodigy``            ``prodigyopt`` 1.1.2                      Prodigy (Mishchenko & Defazio 2024), lr 1.0
``d-adapt-adam``       ``dadaptation`` 3.2                       D-Adaptation Adam (Defazio & Mishchenko 2023), lr 1.0
``dog``                ``dog-optimizer`` 1.0.3                   DoG (Ivgi, Hinder & Carmon 2023) with the package's
                                                                 polynomial-decay iterate averaging (γ = 8)
``mechanic-adam``      ``mechanic-pytorch`` 0.0.1                Mechanic (Cutkosky, Defazio & Mehta 2023) tuning the
                                                                 scale of torch's Adam at lr 1.0
=====================  ========================================  ====================================================

They are never tuned: not needing a learning rate is their promise, so the suites run them at these defaults.

Two of them evaluate at other weights than they train at. Schedule-Free trains at its interpolation y and is
evaluated at its average x (its ``train()`` / ``eval()`` switch); DoG's authors write that "DoG/L-DoG must be combined
with iterate averaging" for its results, so ``dog`` keeps the package's ``PolynomialDecayAverager`` and its ``eval()``
puts the averaged weights in the parameters (``train()`` puts the iterate back). Both follow one protocol: an
optimizer with ``eval`` / ``train`` methods is switched to ``eval()`` for held-out evaluation by
:func:`evaluation_mode`, which the evaluation harness uses; training losses are taken in train mode. The mode and the
average are in ``state_dict()`` and survive a round trip.

Every face adds metaopt's non-finite guard (``nonfinite="skip"``, the default of metaopt's own faces: a step whose
gradients hold NaN or inf leaves the parameters and the package's state untouched and is counted in
``param_groups[i]["nonfinite_skipped"]``; ``"raise"`` raises). The packages themselves do not guard: fed a NaN
gradient, each writes NaN into its parameters or state, DoG then failing an assertion (tests/test_external.py).

``mechanic-adam``'s ``state_dict()`` keys its per-parameter reference points by the parameter tensors themselves (the
package's layout), so a state loaded into an optimizer over *other* tensors (a fresh model) does not resume it; the
contract test marks that as the package's limit.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from metaopt.core import NONFINITE_MODES, NonfiniteGuard
from metaopt.registry import MemoryModel, register_optimizer

# name -> (pip requirement, module) of the packages behind the registered names
PACKAGES: dict[str, tuple[str, str]] = {
    "schedule-free-adamw": ("schedulefree==1.4.1", "schedulefree"),
    "prodigy": ("prodigyopt==1.1.2", "prodigyopt"),
    "d-adapt-adam": ("dadaptation==3.2", "dadaptation"),
    "dog": ("dog-optimizer==1.0.3", "dog"),
    "mechanic-adam": ("mechanic-pytorch==0.0.1", "mechanic_pytorch"),
}
EXTERNAL_NAMES: tuple[str, ...] = tuple(PACKAGES)
DOG_AVERAGING_GAMMA = 8.0  # the PolynomialDecayAverager's default, "should work well out of the box" (DoG's README)


def _package(name: str) -> Any:
    """The module behind the registered ``name``, imported when first used, with what to do when it is missing."""
    requirement, module = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"Optimizer {name!r} needs the package {requirement.split('==')[0]!r}: pip install "
                          f"'{requirement}' (bash .ci/setup installs it with metaopt)") from err


@contextlib.contextmanager
def evaluation_mode(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Evaluate at the optimizer's evaluation weights inside the block: for an optimizer with ``eval`` / ``train``
    (Schedule-Free's average x, DoG's polynomial-decay average) ``eval()`` on entry and ``train()`` on exit, whatever
    mode it was in before; any other optimizer is left alone."""
    if not (callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


@functools.cache
def _guarded(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``base`` with metaopt's non-finite guard in front of its ``step`` (see the module docstring)."""

    class Guarded(NonfiniteGuard, base):  # type: ignore[misc, valid-type]
        def __init__(self, params: Iterable[Any], *args: Any, nonfinite: str = "skip", **kwargs: Any):
            if nonfinite not in NONFINITE_MODES:
                raise ValueError(f"Invalid nonfinite: {nonfinite!r} (expected one of {NONFINITE_MODES})")
            self.nonfinite, self._warned_nonfinite = nonfinite, False
            super().__init__(params, *args, **kwargs)
            for group in self.param_groups:
                group.setdefault("nonfinite_skipped", 0)

        def step(self, closure: Callable[[], torch.Tensor] | None = None) -> Any:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
                closure = None
            else:
                loss = None
            # the package steps every group at once, so a non-finite gradient anywhere skips (and counts in) all
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            if not self.check_finite(self.param_groups[0], grads):
                for group in self.param_groups[1:]:
                    self.skip_nonfinite(group, "gradient (NaN or inf)")
                return loss
            grad_mode = torch.is_grad_enabled()
            try:
                result = super().step()
            finally:  # mechanic_pytorch turns grad mode off inside its step and leaves it off if the step raises
                torch.set_grad_enabled(grad_mode)
            return loss if loss is not None else result

    Guarded.__name__ = Guarded.__qualname__ = base.__name__
    Guarded.__doc__ = base.__doc__
    return Guarded


# The registrations' records (metaopt.registry). test_hparams, for the contract tests' least-squares problem
# (tests/test_contract.py, 40 steps): the packages' defaults, except where 40 steps are too few for the default's warm
# start (DoG's first step is reps_rel * (1 + |x0|); Schedule-Free's lr is Adam-like) and D-Adapt Adam's bias
# correction (off by default: without it the D estimate overshoots this problem within 40 steps). The memory models
# count the packages' state. Each factory builds a subclass of its package's torch.optim.Optimizer whose step needs
# nothing but p.grad (builds=torch.optim.Optimizer).
@register_optimizer("schedule-free-adamw", kind="parameter-free", builds=torch.optim.Optimizer,
                    test_hparams=dict(lr=0.05), memory=MemoryModel(2, 0, "z, v (the parameters hold y)"))
def schedule_free_adamw(params: Iterable[Any], lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                        eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                        weight_lr_power: float = 2.0, nonfinite: str = "skip") -> torch.optim.Optimizer:
    """Schedule-Free AdamW (Defazio et al. 2024; ``schedulefree.AdamWScheduleFree``) at the package's defaults,
    returned in train mode (ready to step; ``eval()`` before evaluating, see :func:`evaluation_mode`)."""
    cls = _guarded(_package("schedule-free-adamw").AdamWScheduleFree)
    optimizer = cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                    weight_lr_power=weight_lr_power, nonfinite=nonfinite)
    optimizer.train()
    return optimizer


@register_optimizer("prodigy", kind="parameter-free", builds=torch.optim.Optimizer, test_hparams={},
                    memory=MemoryModel(4, 3, "s, p0, m, v; reads g, p0, p for <g, p0 - p> before the update"))
def prodigy(params: Iterable[Any], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
            beta3: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = True,
            use_bias_correction: bool = False, safeguard_warmup: bool = False, d0: float = 1e-6,
            d_coef: float = 1.0, growth_rate: float = float("inf"), nonfinite: str = "skip") -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2024; ``prodigyopt.Prodigy``) at the package's defaults."""
    cls = _guarded(_package("prodigy").Prodigy)
    return cls(params, lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay, decouple=decouple,
               use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef,
               growth_rate=growth_rate, nonfinite=nonfinite)


@register_optimizer("d-adapt-adam", kind="parameter-free", builds=torch.optim.Optimizer,
                    test_hparams=dict(use_bias_correction=True),
                    memory=MemoryModel(3, 2, "s, m, v; reads g, s for <g, s> before the update"))
def d_adapt_adam(params: Iterable[Any], lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decouple: bool = False,
                 use_bias_correction: bool = False, d0: float = 1e-6, growth_rate: float = float("inf"),
                 nonfinite: str = "skip") -> torch.optim.Optimizer:
    """D-Adaptation Adam (Defazio & Mishchenko 2023; ``dadaptation.DAdaptAdam``) at the package's defaults."""
    cls = _guarded(_package("d-adapt-adam").DAdaptAdam)
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
               use_bias_correction=use_bias_correction, d0=d0, growth_rate=growth_rate, nonfinite=nonfinite)


@register_optimizer("mechanic-adam", kind="parameter-free", builds=torch.optim.Optimizer, test_hparams={},
                    memory=MemoryModel(4, 4, "Adam's m, v, the reference x0, the offset; copies g and p before Adam's "
                                             "step"))
def mechanic_adam(params: Iterable[Any], lr: float = 1.0, s_decay: float = 0.01, s_init: float = 1e-8,
                  nonfinite: str = "skip") -> torch.optim.Optimizer:
    """Mechanic (Cutkosky, Defazio & Mehta 2023; ``mechanic_pytorch.mechanize``) learning the scale of
    ``torch.optim.Adam``'s updates. ``lr`` is the base Adam's: the package's README sets 1.0 ("you can set the lr to
    anything here, but excessively small values may cause numerical precision issues"); ``s_decay`` and ``s_init``
    are ``mechanize``'s defaults, its six betas too."""
    mechanized = _package("mechanic-adam").mechanize(torch.optim.Adam, s_decay=s_decay, s_init=s_init)
    return _guarded(mechanized)(params, lr=lr, nonfinite=nonfinite)


class _Holder(nn.Module):
    """The parameter tensors as buffers of a module (the averager's interface), shared, not copied."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"p{i}", t)


@functools.cache
def _averaged_dog(base: type[torch.optim.Optimizer], averager: type) -> type[torch.optim.Optimizer]:
    class AveragedDoG(base):  # type: ignore[misc, valid-type]
        """DoG with the package's polynomial-decay iterate averaging after every step; ``eval()`` / ``train()``
        swap the average in and out of the parameters. The average is the per-parameter state ``"pda_average"``
        and its counter ``param_groups[0]["pda_t"]``, so ``state_dict()`` carries both."""

        def __init__(self, params: Iterable[Any], *args: Any, gamma: float = DOG_AVERAGING_GAMMA, **kwargs: Any):
            super().__init__(params, *args, **kwargs)
            self._iterate: list[torch.Tensor] | None = None  # the DoG iterate while eval() holds the average
            tensors = self._tensors()
            with torch.no_grad():
                self._averager = averager(_Holder(tensors), gamma=gamma)
            self._averager._matched_devices = True  # the average is a copy on the parameters' devices already
            self.param_groups[0].setdefault("pda_t", self._averager.t)
            self.param_groups[0].setdefault("pda_gamma", gamma)
            self._link()

        def _tensors(self) -> list[torch.Tensor]:
            return [p for group in self.param_groups for p in group["params"]]

        def _link(self) -> None:
            """Point the averager's model at the parameters and its average at the optimizer state."""
            holder = self._averager.av_model
            for i, p in enumerate(self._tensors()):
                state = self.state[p]
                if "pda_average" not in state:
                    state["pda_average"] = holder._buffers[f"p{i}"].detach()
                holder._buffers[f"p{i}"] = state["pda_average"]
                self._averager.model._buffers[f"p{i}"] = p
            self._averager.t = self.param_groups[0]["pda_t"]
            self._averager.gamma = self.param_groups[0]["pda_gamma"]

        def step(self, closure: Callable[[], torch.Tensor] | None = None) -> Any:
            if self._iterate is not None:
                raise RuntimeError("dog: step() in eval mode (the parameters hold the average); call train() first")
            skipped = sum(g.get("nonfinite_skipped", 0) for g in self.param_groups)
            loss = super().step(closure)
            if sum(g.get("nonfinite_skipped", 0) for g in self.param_groups) == skipped:
                with torch.no_grad():
                    self._averager.step()
                self.param_groups[0]["pda_t"] = self._averager.t
            return loss

        def eval(self) -> None:
            if self._iterate is None:
                with torch.no_grad():
                    self._iterate = [p.clone() for p in self._tensors()]
                    for p in self._tensors():
                        p.copy_(self.state[p]["pda_average"])

        def train(self) -> None:
            if self._iterate is not None:
                with torch.no_grad():
                    for p, x in zip(self._tensors(), self._iterate):
                        p.copy_(x)
                self._iterate = None

        def state_dict(self) -> dict[str, Any]:
            if self._iterate is not None:
                raise RuntimeError("dog: state_dict() in eval mode would save the average as the iterate; call "
                                   "train() first")
            return super().state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.train()
            super().load_state_dict(state_dict)
            self._link()

    return AveragedDoG


@register_optimizer("dog", kind="parameter-free", builds=torch.optim.Optimizer, test_hparams=dict(reps_rel=1e-2),
                    memory=MemoryModel(2, 3, "x0, the polynomial-decay average; reads p, x0, g for |x - x0| and |g|^2"))
def dog(params: Iterable[Any], reps_rel: float = 1e-6, lr: float = 1.0, weight_decay: float = 0.0, eps: float = 1e-8,
        init_eta: float | None = None, averaging: bool = True, gamma: float = DOG_AVERAGING_GAMMA,
        nonfinite: str = "skip") -> torch.optim.Optimizer:
    """DoG (Ivgi, Hinder & Carmon 2023; ``dog.DoG``) at the package's defaults (``reps_rel`` 1e-6; its authors suggest
    1e-4 for models with batch normalization), with the package's ``PolynomialDecayAverager`` (``gamma`` 8), which
    its authors call required for DoG's results (``averaging=False``: the bare iterate)."""
    package = _package("dog")
    cls = _guarded(package.DoG)
    if averaging:
        cls = _averaged_dog(cls, package.PolynomialDecayAverager)
        return cls(params, reps_rel=reps_rel, lr=lr, weight_decay=weight_decay, eps=eps, init_eta=init_eta,
                   nonfinite=nonfinite, gamma=gamma)
    return cls(params, reps_rel=reps_rel, lr=lr, weight_decay=weight_decay, eps=eps, init_eta=init_eta,
               nonfinite=nonfinite)
